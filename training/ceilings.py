"""Ceilings: what an oracle rescue policy reaches on the same problems, and what it costs.

Every rescue number needs a reference: a learned trigger cannot do better than a policy that knows
the answer. Four oracles, each given what no deployable trigger has:

- `commit-oracle` (a): commit to the first *correct* candidate answer stated anywhere in the naive 2-bit
  trace (no FP16 tokens; a trace without one keeps its outcome). Computed from the `2bit` records.
- `ceiling-loop` (b): the 2-bit trace runs; as soon as the loop labeler (`training.labels.find_loop`)
  finds a loop in it, the trace is cut back to the labeled onset and FP16 finishes it.
- `ceiling-step` (c): the 2-bit trace runs; every arithmetic step it writes ("a op b = c") is checked
  against the problem's chain (right operands, right result); at the first wrong one the line is cut
  and FP16 rewrites it (`STEP_SPAN` tokens), then hands back to 2-bit. Generated arithmetic only.
- `fp16` (d): FP16 from the start (the `fp16` method).

(b) and (c) run through the rescue controller with oracle triggers, so their costs are counted like
every method's.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from inference.control.arithmetic import step_at_end, token_at_char
from inference.control.triggers import Alarm, Trigger
from inference.evaluation.answers import find_candidate_answers
from inference.evaluation.grading import is_correct
from training.labels import find_loop

CEILINGS = ("ceiling-loop", "ceiling-step")
STEP_SPAN = 16
"""FP16 tokens written from the start of a wrong step before handing back (a step line is 9-16 characters)."""
LOOP_CHECK_EVERY = 16
"""The loop oracle runs the labeler every this many tokens (a loop is labeled only after R repeats anyway)."""

_WORDS = {"add": "+", "subtract": "-", "multiply by": "*"}
_OPERATION = re.compile(r"(add|subtract|multiply by) (\d+)", re.IGNORECASE)
_START = re.compile(r"Start with (-?\d+)\.")


def arith_steps(question: str) -> set[tuple[int, str, int, int]] | None:
    """The (value, op, operand, result) steps of a generated arithmetic question, or None if it is not one."""
    start = _START.search(question)
    if start is None:
        return None
    value, steps = int(start.group(1)), set()
    for word, operand in _OPERATION.findall(question[start.end():]):
        op, operand = _WORDS[word.lower()], int(operand)
        result = value + operand if op == "+" else value - operand if op == "-" else value * operand
        steps.add((value, op, operand, result))
        value = result
    return steps or None


class StepOracleTrigger(Trigger):
    """Alarms at the first wrong arithmetic step of a line (see the module docstring), onset at the line's start."""

    name = "ceiling-step"
    policy_name = "oracle-step"

    def __init__(self, tokenizer, questions: Sequence[str]):
        self.tokenizer = tokenizer
        self.steps = [arith_steps(q) for q in questions]
        self.texts: dict[int, list[str]] = {}

    def restart(self, seq, generated):
        self.texts[seq] = [self.tokenizer.decode([t], skip_special_tokens=True) for t in generated]

    def select(self, seq, alarm, candidate_tokens, on_alarm, fallback_available):
        return ("fallback" if fallback_available else "commit"), None

    def observe(self, seqs, positions, tokens, hidden, top_prob):
        alarms = []
        for seq, position, token in zip(seqs, positions, tokens.tolist()):
            pieces = self.texts.setdefault(seq, [])
            piece = self.tokenizer.decode([token], skip_special_tokens=True)
            pieces.append(piece)
            alarms.append(None)
            steps = self.steps[seq]
            if steps is None or len(pieces) != position + 1:
                continue
            recent = pieces[-40:]
            step = step_at_end("".join(recent))
            if step is None or (step.a, step.op, step.b, step.result) in steps:
                continue
            alarms[-1] = Alarm("wrong_step", position, token_at_char(recent, step.start, position))
        return alarms


class LoopOracleTrigger(Trigger):
    """Alarms when the loop labeler finds a loop in the trace so far; onset: the labeled onset."""

    name = "ceiling-loop"
    policy_name = "oracle-loop"

    def __init__(self, labels_config):
        self.params = labels_config
        self.tokens: dict[int, list[int]] = {}

    def restart(self, seq, generated):
        self.tokens[seq] = [int(t) for t in generated]

    def select(self, seq, alarm, candidate_tokens, on_alarm, fallback_available):
        return ("fallback" if fallback_available else "commit"), None

    def observe(self, seqs, positions, tokens, hidden, top_prob):
        alarms = []
        for seq, position, token in zip(seqs, positions, tokens.tolist()):
            ids = self.tokens.setdefault(seq, [])
            ids.append(int(token))
            loop = find_loop(ids, self.params) if len(ids) % LOOP_CHECK_EVERY == 0 else None
            alarms.append(None if loop is None else Alarm("labeled_loop", position, loop[0]))
        return alarms


def ceiling_trigger(method: str, config, tokenizer, problems) -> tuple[Trigger, object]:
    """The oracle trigger of a ceiling method and the controller settings it runs with."""
    control = config.rescue
    if method == "ceiling-step":
        return (StepOracleTrigger(tokenizer, [p.question for p in problems]),
                dataclasses.replace(control, fallback_span=STEP_SPAN, max_interventions=64, on_alarm="fallback"))
    if method == "ceiling-loop":
        return (LoopOracleTrigger(config.labels),
                dataclasses.replace(control, fallback_span=0, max_interventions=1, on_alarm="fallback"))
    raise ValueError(f"{method!r} is not a ceiling (expected one of {', '.join(CEILINGS)})")


def commit_oracle(records) -> dict:
    """Ceiling (a) from the naive 2-bit records: accuracy when every trace that states a correct candidate
    commits to it, the 2-bit tokens that leaves (up to that candidate's characters), no FP16 tokens."""
    correct, tokens = 0, 0.0
    for r in records:
        hit = next((c for c in find_candidate_answers(r.text) if is_correct(c.text, r.gold)), None)
        if hit is not None:
            correct += 1
            tokens += r.tokens_2bit * hit.end / max(len(r.text), 1)
        else:
            correct += r.correct
            tokens += r.tokens_2bit
    count = max(len(records), 1)
    return {"accuracy": correct / count, "mean_tokens_2bit": tokens / count, "mean_tokens_fp16": 0.0}


def ceiling_rows(summaries: dict, records: dict, weights: dict | None) -> list[dict]:
    """The ceilings table: each oracle's accuracy, FP16 tokens and memory-bound cost (x FP16)."""
    def cost(tokens_2bit: float, tokens_fp16: float) -> float | None:
        base = summaries.get("fp16")
        if not (weights and base and base.get("weight_bytes_read")):
            return None
        per_trace = tokens_2bit * (weights["2bit"] or 0) + tokens_fp16 * (weights["fp16"] or 0)
        return per_trace * base["problems"] / base["weight_bytes_read"]

    rows = []
    if "2bit" in records:
        oracle = commit_oracle(records["2bit"])
        rows.append({"ceiling": "commit-oracle", "what": "(a) commit to the first correct candidate stated",
                     **oracle, "memory_bound_x_fp16": cost(oracle["mean_tokens_2bit"], 0.0)})
    labels = {"ceiling-loop": "(b) FP16 continues from the labeled loop onset",
              "ceiling-step": "(c) FP16 rewrites every wrong arithmetic step, then hands back",
              "fp16": "(d) FP16 from the start"}
    for method, what in labels.items():
        s = summaries.get(method)
        if s:
            rows.append({"ceiling": method, "what": what, "accuracy": s["accuracy"],
                         "mean_tokens_2bit": s["mean_tokens_2bit"], "mean_tokens_fp16": s["mean_tokens_fp16"],
                         "memory_bound_x_fp16": cost(s["mean_tokens_2bit"], s["mean_tokens_fp16"])})
    return rows
