import json
import time

import numpy as np
import pytest

from inference.config import LabelsConfig
from inference.evaluation.repetition import has_loop
from training.arith import arith_dataset
from training.labels import (
    TraceLabels,
    find_loop,
    label_records,
    label_report,
    label_shares,
    label_trace,
    position_targets,
    token_char_ends,
)
from training.tokenizer import build_tokenizer

PARAMS = LabelsConfig()  # P=128, R=3, L=48, H=64, D=256


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def varied(count: int, seed: int = 0) -> list[int]:
    """Token ids that never repeat within a shift of up to P (no accidental loops), disjoint from `block`'s."""
    return (np.random.default_rng(seed).permutation(90_000)[:count] + 10_000).tolist()


def block(length: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).permutation(10_000)[:length].tolist()


def token_completing(tokenizer, text: str, char_end: int) -> int:
    """Index of the token that completes text[:char_end] (markup such as `<think>` is one token)."""
    return len(tokenizer.encode(text[:char_end])) - 1


def encode(tokenizer, text: str, eos: bool = True) -> list[int]:
    return tokenizer.encode(text) + ([tokenizer.eos_token_id] if eos else [])


def labels_of(tokenizer, text: str, finish_reason: str = "eos", gold: str = "70") -> tuple[list[int], TraceLabels]:
    ids = encode(tokenizer, text, eos=finish_reason == "eos")
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == text
    return ids, label_trace(ids, decoded, token_char_ends(tokenizer, ids), finish_reason, gold, PARAMS)


# ----------------------------------------------------------------------------- find_loop: loops


@pytest.mark.parametrize("period, repeats", [(1, 60), (7, 10), (100, 3)])
def test_exact_loop_gives_exact_onset_and_period(period, repeats):
    ids = varied(300) + block(period) * repeats + varied(40, seed=2)
    assert find_loop(ids, PARAMS) == (300, period)


def test_exact_loop_running_to_the_end_of_the_trace():
    ids = varied(500) + block(7) * 300
    assert find_loop(ids, PARAMS) == (500, 7)


def test_loop_with_a_counter_that_also_repeats_verbatim(tokenizer):
    # One block occurs twice as is, then goes on with a counter: a block that repeats, edited.
    prefix = "<think>\nThe step I doubt is the third. Hmm, OK"
    loop = "".join(f"Let me check step {n} again.\n" for n in (3, 3, 4, 5, 6))
    ids = encode(tokenizer, prefix + loop, eos=False)
    assert find_loop(ids, PARAMS) == (len(encode(tokenizer, prefix, eos=False)), len("Let me check step 3 again.\n"))


def test_a_counter_alone_still_makes_a_loop_but_three_things_changing_in_step_do_not(tokenizer):
    # "check step 3 / 4 / 5 again": one edited token per block, a block redone (as before).
    prefix = "<think>\nThe step I doubt is the third. Hmm, OK"
    loop = "".join(f"Let me check step {n} again.\n" for n in range(3, 9))
    ids = encode(tokenizer, prefix + loop, eos=False)
    assert find_loop(ids, PARAMS) == (len(encode(tokenizer, prefix, eos=False)), len("Let me check step 3 again.\n"))
    # Index, operand and result changing together: an enumeration, new content in every block.
    table = "".join(f"Row {n}: {n} * 7 = {n * 7} holds, carry on to the next.\n" for n in range(3, 9))
    assert find_loop(encode(tokenizer, prefix + table, eos=False), PARAMS) is None


def test_counter_that_gains_a_digit_continues_the_loop(tokenizer):
    # 9, 9 (27 characters per block, verbatim), then 10, 11, 12 (28): the period drifts by one token.
    prefix = "<think>\nThe step I doubt is the ninth. Hmm, OK"
    loop = "".join(f"Let me check step {n} again.\n" for n in (9, 9, 10, 11, 12))
    ids = encode(tokenizer, prefix + loop, eos=False)
    assert find_loop(ids, PARAMS) == (len(encode(tokenizer, prefix, eos=False)), 27)


def test_counter_token_in_a_token_level_block():
    # A 12-token block whose 5th token is a counter (as a BPE tokenizer would give a number),
    # the first block occurring twice as is.
    template = block(12)
    blocks = []
    for n in (0, 0, 1, 2, 3, 4):
        edited = list(template)
        edited[4] = 50_000 + n
        blocks += edited
    assert find_loop(varied(200) + blocks + varied(30, seed=3), PARAMS) == (200, 12)
    counting = [token for n in range(6) for token in template[:4] + [50_000 + n] + template[5:]]
    assert find_loop(varied(200) + counting + varied(30, seed=3), PARAMS) == (200, 12)


def test_too_many_edits_per_block_is_not_a_loop():
    # 12-token blocks allow one edited token; two changing tokens per block is new content, even
    # where two blocks are the same.
    template = block(12)
    blocks = []
    for n in (0, 0, 1, 2, 3, 4):
        edited = list(template)
        edited[4], edited[9] = 50_000 + n, 60_000 + n
        blocks += edited
    assert find_loop(varied(200) + blocks[:24] + varied(30, seed=5) + blocks[24:] + varied(30, seed=3),
                     PARAMS) is None


def test_loop_starting_just_before_the_budget_is_found_once_it_covers_min_span():
    budget = 1024
    covered = varied(budget - 60) + block(10) * 6
    assert len(covered) == budget
    assert find_loop(covered, PARAMS) == (budget - 60, 10)
    too_short = varied(budget - 40) + block(10) * 4  # 4 repeats but only 40 < L tokens
    assert find_loop(too_short, PARAMS) is None


def test_chain_redone_three_times_in_a_row_is_a_loop_by_definition(tokenizer):
    chain = "17 + 8 = 25, 25 * 3 = 75, 75 - 5 = 70.\nThat gives 70, as before.\n"
    text = "<think>\nSo the result is 70.\n" + "".join(f"Let me verify again: {chain}" for _ in range(3))
    assert find_loop(encode(tokenizer, text), PARAMS) is not None
    twice = "<think>\nSo the result is 70.\n" + "".join(f"Let me verify again: {chain}" for _ in range(2))
    assert find_loop(encode(tokenizer, twice + "</think>\n\nThe answer is \\boxed{70}."), PARAMS) is None


# ----------------------------------------------------------------------------- find_loop: legitimate repetition


def test_enumeration_is_not_a_loop(tokenizer):
    numbers = ", ".join(str(n) for n in range(1, 21))
    text = f"<think>\nThe multiples are {numbers}. So there are 20 of them.\n</think>\n\nThe answer is 20."
    assert find_loop(encode(tokenizer, text), PARAMS) is None
    longer = ", ".join(str(n) for n in range(1, 101))
    assert find_loop(encode(tokenizer, f"<think>\nCounting: {longer}.\n"), PARAMS) is None


def test_enumeration_of_terms_is_not_a_loop(tokenizer):
    terms = " + ".join(f"2^{n}" for n in range(1, 21))
    assert find_loop(encode(tokenizer, f"<think>\nThe sum is {terms}.\n"), PARAMS) is None


def test_enumeration_with_indices_and_signs_changing_in_step_is_not_a_loop(tokenizer, bpe):
    # The healthy dev trace's sphere equations: index, coordinates and signs change in step.
    corners = [(3, 3), (3, -3), (-3, 3), (-3, -3)]
    sign = lambda v: "-" if v > 0 else "+"  # noqa: E731
    lines = "".join(f"{n}. For ({x}, {y}, 0): (a {sign(x)}3)^2 + (b {sign(y)}3)^2 + c^2 = R^2\n"
                    for n, (x, y) in enumerate(corners, start=2))
    text = f"<think>\nSo, I have five equations:\n1. For apex: a^2 + b^2 + (c - 9/2)^2 = R^2\n{lines}So, since"
    for tok in (tokenizer, bpe):
        assert find_loop(tok.encode(text, add_special_tokens=False), PARAMS) is None
        # The same equation written out three times is a loop.
        same = f"<think>\nSo, I have:\n" + "For (3, 3, 0): (a -3)^2 + (b -3)^2 + c^2 = R^2\n" * 3 + "So"
        assert find_loop(tok.encode(same, add_special_tokens=False), PARAMS) is not None


def test_symmetric_derivation_with_variable_names_in_step_is_not_a_loop(tokenizer, bpe):
    text = "<think>\n" + "".join(
        f"Differentiating with respect to {v}: d/d{v} (x^2 + y^2 + z^2 - 2{v}) = 2{v} - 2 = 0, so {v} = 1.\n"
        for v in "xyzw") + "So all are 1.\n"
    for tok in (tokenizer, bpe):
        assert find_loop(tok.encode(text, add_special_tokens=False), PARAMS) is None


def test_repeated_block_with_small_edits_is_a_loop_on_bpe_text(bpe):
    # The dev file's looping pattern: a paragraph repeated, its connective word changing.
    prefix = "<think>\nSo the ratio of the hexagon sides is what we need.\n\n"
    words = ["Thus", "Thus", "Therefore", "So", "Therefore", "Thus"]
    text = prefix + "".join(f"{w}, 2:3:3.0 is 200:240:300.\n\n" for w in words)
    ids = bpe.encode(text, add_special_tokens=False)
    onset, period = find_loop(ids, PARAMS)
    # The prefix ends as the block does (".\n\n"), so the periodic stretch starts a few tokens early.
    start = len(bpe.encode(prefix, add_special_tokens=False))
    assert start - 4 <= onset <= start
    assert period == len(bpe.encode("Thus, 2:3:3.0 is 200:240:300.\n\n", add_special_tokens=False))


def test_one_recheck_of_a_step_is_not_a_loop(tokenizer):
    text = (
        "<think>\nPlan: apply the 3 operations in order, then check.\n27 + 39 = 66\n"
        "Wait, let me check 27 + 39. 27 + 39 = 66. Yes.\n66 - 33 = 33\n33 * 2 = 66\n"
        "So the result is 66.\n</think>\n\nThe answer is \\boxed{66}."
    )
    assert find_loop(encode(tokenizer, text), PARAMS) is None
    # A 60-token block done twice, even with part of a third, stays under R = 3 occurrences.
    assert find_loop(varied(100) + block(60) * 2 + block(60)[:50] + varied(50, seed=4), PARAMS) is None


def test_repeated_short_phrase_is_not_a_loop(tokenizer):
    text = "<think>\n17 + 8 = 25. Yes. Yes. Yes. So the result is 25.\n</think>\n\nThe answer is \\boxed{25}."
    assert find_loop(encode(tokenizer, text), PARAMS) is None


def test_false_loop_rate_on_healthy_arith_traces_is_low(tokenizer):
    traces = list(arith_dataset("test", 200)["trace"]) + list(arith_dataset("val", 200)["trace"])
    found = [t for t in traces if find_loop(encode(tokenizer, t), PARAMS) is not None]
    rate = len(found) / len(traces)
    print(f"false-loop rate on {len(traces)} healthy arith traces: {rate:.2%}")
    assert rate <= 0.02
    # What is found is what the definition calls a loop: a chain done four times in a row
    # (three "verify again" passes) or one step re-checked three times.
    for trace in found:
        rechecks = [line for line in trace.splitlines() if line.startswith("Wait, let me check")]
        assert trace.count("Let me verify again") >= 3 or len(rechecks) - len(set(rechecks)) >= 2


def test_find_loop_is_fast_on_an_8k_token_trace(tokenizer):
    text = "".join(arith_dataset("test", 200)["trace"])
    ids = encode(tokenizer, text, eos=False)[:8192]
    looping = ids[:6000] + block(50) * 44
    for sequence in (ids, looping):
        began = time.perf_counter()
        find_loop(sequence, PARAMS)
        elapsed = time.perf_counter() - began
        print(f"find_loop on {len(sequence)} tokens: {elapsed * 1000:.1f} ms")
        assert elapsed < 1.0
    assert find_loop(looping, PARAMS) == (6000, 50)


# ----------------------------------------------------------------------------- token offsets


def test_token_char_ends_of_the_char_tokenizer(tokenizer):
    text = "<think>\nSo the result is 70.\n</think>\n\nThe answer is \\boxed{70}."
    ids = encode(tokenizer, text)
    ends = token_char_ends(tokenizer, ids)
    assert len(ends) == len(ids)
    assert ends[0] == len("<think>") and ends[1:4] == [8, 9, 10]
    assert ends[-1] == ends[-2] == len(text)  # EOS adds no text
    for i in range(len(ids)):
        assert text[: ends[i]] == tokenizer.decode(ids[: i + 1], skip_special_tokens=True)


def small_subword_tokenizer(kind: str):
    """A tiny BPE trained here on ASCII text: byte-level as Qwen3's (so "é" and "≥" are one token
    per byte) or with SentencePiece's metaspace (a token decoded alone loses its leading space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "byte-level":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"])
    backend.train_from_iterator(["the answer is 17 and the result is 42, so far"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.mark.parametrize("kind, text", [
    ("byte-level", "the café result is ≥ 17, the answer is 42"),
    ("metaspace", "the result is 17, so the answer is 42"),
])
def test_token_char_ends_of_subword_tokenizers(kind, text):
    subword = small_subword_tokenizer(kind)
    ids = subword.encode(text)
    assert len(ids) > len(text.split())  # really split below the word
    ends = token_char_ends(subword, ids)
    assert ends[-1] == len(text) and ends == sorted(ends)
    consistent = 0
    for i in range(len(ids)):
        prefix = subword.decode(ids[: i + 1], skip_special_tokens=True)
        if text.startswith(prefix):
            assert text[: ends[i]] == prefix
            consistent += 1
    assert consistent >= len(ids) - 3  # only tokens inside "é" and "≥" decode to a broken character


# ----------------------------------------------------------------------------- label_trace


def test_healthy_trace_labels(tokenizer):
    trace = arith_dataset("test", 1)[0]
    ids, labels = labels_of(tokenizer, trace["trace"], gold=trace["answer"])
    assert labels.length == len(ids)
    assert labels.loop_onset is None and labels.loop_period is None
    assert labels.committed and labels.correct
    assert not (labels.budget_exhausted or labels.unclosed_think or labels.fails_to_commit or labels.delayed_commitment)
    # The first candidate is "So the result is N": its last digit completes it.
    stated = trace["trace"].index(f"result is {trace['answer']}") + len(f"result is {trace['answer']}")
    assert labels.first_candidate_pos == token_completing(tokenizer, trace["trace"], stated)


def test_final_answer_is_the_candidate_when_thinking_states_none(tokenizer):
    text = "<think>\nHmm.\n</think>\n\nThe answer is \\boxed{70}."
    _, labels = labels_of(tokenizer, text)
    assert labels.first_candidate_pos == token_completing(tokenizer, text, text.index("70}") + 2)
    assert labels.committed and labels.correct and not labels.delayed_commitment


def test_unclosed_think(tokenizer):
    text = "<think>\n17 + 8 = 25\n25 * 3 = 75\nI am not sure where this goes."
    _, labels = labels_of(tokenizer, text)  # stopped by EOS, never closed its thinking
    assert labels.unclosed_think and labels.fails_to_commit and not labels.committed
    assert not labels.budget_exhausted and not labels.correct
    assert labels.first_candidate_pos is None and not labels.delayed_commitment


def test_budget_hit_after_a_candidate_answer(tokenizer):
    rng = np.random.default_rng(0)
    wandering = "".join(f"Maybe {a} + {b} = {a + b} matters here.\n" for a, b in rng.integers(10, 999, (20, 2)))
    text = "<think>\n17 + 8 = 25\n25 * 3 = 75\n75 - 5 = 70\nSo the result is 70.\n" + wandering
    ids, labels = labels_of(tokenizer, text, finish_reason="budget")
    assert labels.loop_onset is None
    assert labels.budget_exhausted and labels.unclosed_think
    assert labels.fails_to_commit and not labels.committed and not labels.correct
    assert labels.first_candidate_pos == token_completing(tokenizer, text, text.index("result is 70") + len("result is 70"))
    assert len(ids) - 1 - labels.first_candidate_pos > PARAMS.commit_delay
    assert labels.delayed_commitment


def test_budget_hit_after_a_closed_answer_does_not_commit(tokenizer):
    text = "<think>\nSo the result is 70.\n</think>\n\nThe answer is 70. The answer is 70 and"
    _, labels = labels_of(tokenizer, text, finish_reason="budget")
    assert labels.budget_exhausted and not labels.unclosed_think
    assert labels.fails_to_commit and not labels.committed


def test_labels_round_trip_through_json(tokenizer):
    _, labels = labels_of(tokenizer, "<think>\nSo the result is 70.\n</think>\n\nThe answer is \\boxed{70}.")
    assert TraceLabels.from_dict(json.loads(json.dumps(labels.to_dict()))) == labels


def test_label_trace_rejects_offsets_of_another_length(tokenizer):
    ids = encode(tokenizer, "<think>\nHi.")
    with pytest.raises(ValueError, match="token_ends"):
        label_trace(ids, "<think>\nHi.", [1, 2], "eos", "1", PARAMS)


# ----------------------------------------------------------------------------- position targets


def _labels(length: int, onset: int | None, fails: bool = False) -> TraceLabels:
    return TraceLabels(length=length, loop_onset=onset, loop_period=None if onset is None else 7,
                       budget_exhausted=fails, unclosed_think=fails, committed=not fails, first_candidate_pos=None,
                       delayed_commitment=False, correct=not fails, fails_to_commit=fails)


def test_position_targets_around_the_onset():
    loop_within_h, fails = position_targets(_labels(400, onset=200, fails=True), horizon=64)
    assert loop_within_h.shape == (400,) and loop_within_h.dtype == bool
    assert not loop_within_h[:136].any() and loop_within_h[136:].all()
    assert fails is True


def test_position_targets_without_a_loop_or_with_an_early_onset():
    loop_within_h, fails = position_targets(_labels(100, onset=None), horizon=64)
    assert loop_within_h.shape == (100,) and not loop_within_h.any() and fails is False
    loop_within_h, _ = position_targets(_labels(100, onset=30), horizon=64)
    assert loop_within_h.all()


# ----------------------------------------------------------------------------- report


def test_label_report_writes_table_and_plots(tmp_path):
    labels = [_labels(300, None), _labels(500, 120, fails=True), _labels(1024, 700, fails=True), _labels(250, None)]
    summary = label_report(labels, tmp_path / "report")
    assert summary["traces"] == 4
    assert summary["counts"]["loop"] == 2 and summary["rates"]["loop"] == 0.5
    assert summary["counts"]["fails_to_commit"] == 2
    assert summary["loop_onset"]["median"] == 410 and summary["loop_period"]["max"] == 7
    assert summary["length_healthy"]["mean"] == 275 and summary["length_failing"]["max"] == 1024
    table = (tmp_path / "report" / "label-report.md").read_text()
    assert "| loop | 2 | 50.0% |" in table
    for name in ("loop-onsets.png", "loop-periods.png", "trace-lengths.png"):
        assert (tmp_path / "report" / name).read_bytes().startswith(b"\x89PNG")


def test_label_report_without_loops(tmp_path):
    summary = label_report([_labels(300, None)], tmp_path)
    assert summary["counts"]["loop"] == 0 and summary["loop_onset"] == {"count": 0}
    assert (tmp_path / "loop-onsets.png").exists()


# ----------------------------------------------------------------------------- evaluation records

PASS = "Let me verify again: 3 + 4 = 7, 7 * 2 = 14, 14 - 5 = 9, 9 * 6 = 54, 54 + 11 = 65.\nThat gives 65, not 65.\n"


def test_label_records_labels_evaluation_rows_as_their_generated_ids(tokenizer):
    healthy = "<think>\nPlan: apply the 5 operations in order.\n3 + 4 = 7\n7 * 2 = 14\n14 - 5 = 9\n9 * 6 = 54\n" \
              "54 + 11 = 65\nSo the result is 65.\n</think>\n\nThe answer is \\boxed{65}."
    # Passes that never see their own agreement: two alternating lines, which the naive check misses.
    looping = "<think>\n3 + 4 = 7\n7 * 2 = 14\n14 - 5 = 9\n9 * 6 = 54\n54 + 11 = 65\nSo the result is 65.\n" + \
              PASS * 4 + "</think>\n\nThe answer is \\boxed{65}."
    cut = "<think>\n3 + 4 = 7\n7 * 2 = 14\n"
    rows = [{"text": healthy, "finish_reason": "eos", "gold": "65"},
            {"text": looping, "finish_reason": "eos", "gold": "65"},
            {"text": cut, "finish_reason": "budget", "gold": "65"}]
    labels = label_records(rows, tokenizer, PARAMS)
    assert labels[0] == labels_of(tokenizer, healthy, gold="65")[1]
    assert labels[0].loop_onset is None and labels[0].committed
    assert labels[1].loop_onset is not None and labels[1].committed and not has_loop(looping)
    assert labels[2].fails_to_commit and labels[2].length == len(tokenizer.encode(cut))
    shares = label_shares(labels)
    assert shares["loop"] == pytest.approx(1 / 3) and shares["fails_to_commit"] == pytest.approx(1 / 3)
    assert shares["loop_or_fails_to_commit"] == pytest.approx(2 / 3) and shares["correct"] == pytest.approx(2 / 3)
    assert label_shares([])["loop"] == 0.0


def test_candidates_are_graded_and_targeted_at_the_next_captured_position():
    from training.labels import TraceLabels, candidate_targets

    tokenizer = build_tokenizer()
    text = "<think>\nSo the result is 12.\nSo the result is 13.\n</think>\n\nThe answer is \\boxed{13}."
    ids = tokenizer.encode(text, add_special_tokens=False)
    labels = label_trace(ids, tokenizer.decode(ids), token_char_ends(tokenizer, ids), "eos", "13", LabelsConfig())
    assert [ok for _, ok in labels.candidates] == [False, True]
    first, second = (token for token, _ in labels.candidates)
    assert tokenizer.decode(ids[: first + 1]).endswith("12") and tokenizer.decode(ids[: second + 1]).endswith("13")
    positions = np.arange(0, len(ids), 8)
    targets = candidate_targets(labels, positions)
    assert np.isnan(targets).sum() == len(positions) - 2
    assert targets[np.searchsorted(positions, first)] == 0.0 and targets[np.searchsorted(positions, second)] == 1.0
    # labels.json written before candidates existed still reads, with none.
    old = {k: v for k, v in labels.to_dict().items() if k != "candidates"}
    assert TraceLabels.from_dict(old).candidates == ()
    assert TraceLabels.from_dict(labels.to_dict()) == labels


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_arithmetic_steps_are_labeled_at_their_closing_token(kind, bpe):
    from training.collect import capture_positions
    from training.labels import TraceLabels, step_targets

    tokenizer = build_tokenizer() if kind == "char" else bpe
    text = ("<think>\n27 + 39 = 66\n66 - 33 = 34\nLet me verify: 27 + 39 = 66, 66 - 33 = 33.\n</think>\n\n"
            "The answer is \\boxed{33}. 1 + 1 = 3.")
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoded = tokenizer.decode(ids)
    labels = label_trace(ids, decoded, token_char_ends(tokenizer, ids), "eos", "33", LabelsConfig())
    # Four steps while thinking (the one in the reply is not a step of the reasoning); the second is wrong.
    assert [wrong for _, wrong, _ in labels.steps] == [False, True, False, False]
    for (token, _, start), result in zip(labels.steps, ["66", "34", "66", "33"]):
        assert any(c in ",.\n" for c in tokenizer.decode(ids[token : token + 1]))  # the token holding the break
        assert result in tokenizer.decode(ids[start : token + 1])
        assert tokenizer.decode(ids[:start]).rstrip().endswith("=")
    positions = np.array(capture_positions(len(ids), labels, None, stride=16, window=0))
    assert all(token in positions for token, _, _ in labels.steps)  # every closing token is captured
    targets = step_targets(labels, positions)
    assert np.nansum(targets) == 1.0 and (~np.isnan(targets)).sum() == 4
    assert targets[np.searchsorted(positions, labels.steps[1][0])] == 1.0
    # A closing token that was not captured gets no target; older labels.json files read with no steps.
    assert np.isnan(step_targets(labels, np.arange(0, len(ids), 97))).sum() >= len(np.arange(0, len(ids), 97)) - 1
    old = {k: v for k, v in labels.to_dict().items() if k != "steps"}
    assert TraceLabels.from_dict(old).steps == ()
    assert TraceLabels.from_dict(json.loads(json.dumps(labels.to_dict()))) == labels
