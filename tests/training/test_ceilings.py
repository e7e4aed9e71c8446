"""Oracle ceilings (training/ceilings.py)."""

import torch

from inference.evaluation.evaluate import ProblemRecord
from training.ceilings import StepOracleTrigger, arith_steps, commit_oracle
from training.tokenizer import build_tokenizer


def test_arith_steps_follow_the_chain_left_to_right():
    steps = arith_steps("Start with 17. Add 8, multiply by 3, subtract 5. What is the result?")
    assert steps == {(17, "+", 8, 25), (25, "*", 3, 75), (75, "-", 5, 70)}
    assert arith_steps("What is 2 + 2?") is None


def _observe(trigger, tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    trigger.restart(0, [])
    alarms = [trigger.observe([0], [p], torch.tensor([t]), {}, None)[0] for p, t in enumerate(ids)]
    return ids, alarms


def test_step_oracle_alarms_at_a_wrong_step_with_the_onset_at_its_start():
    tokenizer = build_tokenizer()
    trigger = StepOracleTrigger(tokenizer, ["Start with 17. Add 8, multiply by 3, subtract 5. What is the result?"])
    text = "17 + 8 = 25\n25 * 3 = 65\n"
    ids, alarms = _observe(trigger, tokenizer, text)
    fired = [i for i, a in enumerate(alarms) if a]
    assert fired == [len(text) - 1]  # at the newline closing the wrong line, not at the right one
    assert tokenizer.decode(ids[alarms[fired[0]].onset:]).startswith("25 * 3 = 65")
    _, quiet = _observe(trigger, tokenizer, "17 + 8 = 25\n25 * 3 = 75\n75 - 5 = 70.")
    assert not any(quiet)
    # A wrong operand copied from nowhere is caught too, though its arithmetic is right.
    _, copied = _observe(trigger, tokenizer, "17 + 8 = 25\n26 * 3 = 78,")
    assert any(copied)


def _record(text, gold, correct, tokens):
    return ProblemRecord(problem_id="p", method="2bit", sample=0, prompt_tokens=5, generated_tokens=tokens,
                         finish_reason="eos", closed_think=True, loop=False, answer=None, gold=gold,
                         correct=correct, wall_seconds=0.0, text=text, tokens_2bit=tokens)


def test_commit_oracle_counts_a_correct_candidate_stated_anywhere():
    records = [_record("<think>\nSo the result is 70.\nLet me verify ...\n</think>\n\nThe answer is \\boxed{71}.",
                       "70", False, 80),
               _record("<think>\nSo the result is 12.\n</think>\n\nThe answer is \\boxed{12}.", "13", False, 40)]
    oracle = commit_oracle(records)
    assert oracle["accuracy"] == 0.5
    assert oracle["mean_tokens_fp16"] == 0.0 and oracle["mean_tokens_2bit"] < (80 + 40) / 2
