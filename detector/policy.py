"""Learned action selection, calibrated for an FP16 budget on validation traces.

The learned trigger acts on two kinds of alarm: a loop (`loop_within_h`, thresholded for a false-alarm
rate as before) and a rising wrong-answer risk (`ends_wrong`, held at or above a threshold for
`patience` grid steps), whether or not anything loops. At an alarm it scores every candidate answer
stated before it with `answer_correct` (the score at the first capture-grid step after the candidate)
and commits to the best one if that score reaches `commit_threshold`; otherwise it falls back to FP16
from where the risk rose, and FP16 finishes the trace.

Where the detector has a trained `step_wrong` head (text with arithmetic steps), a third threshold joins:
at the token closing each step, a score at or above `step_threshold` hands that step's result to FP16. With
the `check` step action (the default) FP16 first checks the result in one forward pass and rewrites only
from the first token it rejects; with `rewrite` it rewrites every flagged result (cut back to where the
result begins, FP16 writes to the step's break, then hands back to 2-bit).

The thresholds are chosen on validation traces to maximise *modeled* accuracy under an FP16 budget
(FP16 tokens over all tokens, in the mean over traces). The model of one validation trace:
- no alarm: the trace's own outcome, no FP16 tokens;
- commit to candidate c: correct iff c is, no FP16 tokens, the 2-bit tokens up to the alarm;
- fallback at position a: correct with probability `fallback_success` (FP16's own accuracy is the
  natural value), FP16 tokens `max(reference - a, reference / 4)`, where `reference` is the mean
  length of the correct validation traces (a healthy trace's length), and the 2-bit tokens up to a;
- step actions: with `rewrite`, every step scored at or above `step_threshold` costs its result's tokens
  and the break in FP16; with `check`, every such step costs one FP16 forward pass (counted as one FP16
  token: one read of the FP16 weights) and the wrong ones among them also their result's tokens (FP16 is
  modeled to reject a wrong result and accept a right one). A trace with wrong steps whose every wrong
  step is handed to FP16 is correct with probability
  `fallback_success` and as long as `reference` unless an alarm fires on it: the alarms watch a repaired
  trace too (the 2-bit trace's scores stand in for it), and there a commit is graded as the 2-bit trace
  stated the candidate and a fallback costs its FP16 tokens on top of the step actions. Otherwise the
  rewrites are spent and the trace goes on as above (a partly repaired trace is modeled as not repaired).
  (Without the alarms on repaired traces the model missed most fallbacks: on tiny-s's main job a
  wrong-answer threshold that the model had fire on 2 of 64 validation traces fell back on 33 of 64 test
  problems, because 44 of the 50 traces it fires on were repaired ones);
- a fallback inherits what 2-bit already wrote: where a wrong step that no step action handed to FP16
  closes before the alarm, FP16's continuation is modeled to end as the 2-bit trace did (it carries the
  wrong result on), not with `fallback_success`. (Without this the model was optimistic: 70% modeled
  against 25% measured for a fallback-only rule on tiny-s, whose 2-bit errors are arithmetic.)
Validation traces hold no FP16 continuations, so the fallback's outcome and length are modeled, not
replayed; `rescue compare` measures what the chosen thresholds really cost and reach.

A grid of budgets (`BUDGETS`) is calibrated at training time and kept in the detector card; at
inference the entry with the largest budget not above the user's `rescue.fp16_budget` is used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from detector.calibration import NEVER, first_alarm, sustained_peak

BUDGETS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)


@dataclass
class PolicyTrace:
    """What the policy needs of one validation trace (scores on the capture grid)."""

    positions: np.ndarray
    """[grid] generated positions of the grid steps."""
    loop: np.ndarray
    """[grid] `loop_within_h` probabilities."""
    wrong: np.ndarray
    """[grid] `ends_wrong` probabilities."""
    candidates: list[tuple[int, float, bool]]
    """(token completing the candidate, its `answer_correct` score, whether it is correct)."""
    length: int
    correct: bool
    steps: list[tuple[int, float, bool, int]] = field(default_factory=list)
    """(token closing the step, its `step_wrong` score, whether its result is wrong, FP16 tokens a rewrite
    costs), for the steps whose closing token was scored."""
    wrong_steps: list[int] = field(default_factory=list)
    """Token closing each step with a wrong result (every one labeled, scored or not)."""


@dataclass
class PolicyChoice:
    """The thresholds chosen for one FP16 budget and what they achieve on the validation traces (modeled)."""

    fp16_budget: float
    wrong_threshold: float
    commit_threshold: float
    modeled_accuracy: float
    modeled_fp16_share: float
    acted: float
    """Share of validation traces with an alarm acted on."""
    committed: float
    fell_back: float
    step_threshold: float = NEVER
    step_rewrites: float = 0.0
    """Mean step rewrites per validation trace."""

    def to_dict(self) -> dict:
        return asdict(self)


def candidate_scores(positions: np.ndarray, scores: np.ndarray, candidates: Sequence[tuple[int, bool]]
                     ) -> list[tuple[int, float, bool]]:
    """Each candidate's `answer_correct` score: the score at the first grid step at or after its token
    (candidates after the last grid step get none and are left out)."""
    scored = []
    for token, correct in candidates:
        index = int(np.searchsorted(positions, token))
        if index < len(positions):
            scored.append((int(token), float(scores[index]), bool(correct)))
    return scored


def step_scores(positions: np.ndarray, scores: np.ndarray, steps: Sequence[tuple[int, bool, int]]
                ) -> list[tuple[int, float, bool, int]]:
    """Each arithmetic step's `step_wrong` score (at the captured position of the token closing it; steps
    whose closing token was not captured are left out) and the FP16 tokens its rewrite costs."""
    scored = []
    for token, wrong, start in steps:
        index = int(np.searchsorted(positions, token))
        if index < len(positions) and int(positions[index]) == token:
            scored.append((int(token), float(scores[index]), bool(wrong), max(1, int(token) - int(start) + 1)))
    return scored


STEP_ACTIONS = ("check", "rewrite")


def step_outcomes(traces: Sequence[PolicyTrace], threshold: float, action: str = "rewrite"
                  ) -> list[tuple[bool, float, int]]:
    """Per trace, under step actions at `threshold`: (every wrong step handed to FP16 and there was one,
    FP16 tokens spent on them, steps handed to FP16). `action` is `rewrite` or `check` (module docstring)."""
    if action not in STEP_ACTIONS:
        raise ValueError(f"step action {action!r}: expected one of {', '.join(STEP_ACTIONS)}")
    outcomes = []
    for trace in traces:
        chosen = [s for s in trace.steps if s[1] >= threshold]
        repaired = any(s[2] for s in trace.steps) and first_unrepaired(trace, threshold) is None
        if action == "check":
            spent = len(chosen) + sum(s[3] for s in chosen if s[2])
        else:
            spent = sum(s[3] for s in chosen)
        outcomes.append((repaired, float(spent), len(chosen)))
    return outcomes


def first_unrepaired(trace: PolicyTrace, threshold: float) -> int | None:
    """Token closing the first wrong step (scored or only labeled) that step actions at `threshold` leave to
    2-bit, or None."""
    wrong = {s[0] for s in trace.steps if s[2]} | set(trace.wrong_steps)
    left = wrong - {s[0] for s in trace.steps if s[2] and s[1] >= threshold}
    return min(left) if left else None


def best_candidate(candidates: Sequence[tuple[int, float, bool]], before: int) -> tuple[int, float, bool] | None:
    """The highest-scored candidate completed before generated position `before` (the latest on ties)."""
    eligible = [c for c in candidates if c[0] < before]
    return max(eligible, key=lambda c: (c[1], c[0])) if eligible else None


def alarm_position(trace: PolicyTrace, loop_threshold: float, wrong_threshold: float, patience: int) -> int | None:
    """Generated position of the first alarm (loop or wrong-answer risk), or None."""
    found = []
    for scores, threshold in ((trace.loop, loop_threshold), (trace.wrong, wrong_threshold)):
        index = first_alarm(scores, threshold, patience)
        if index is not None:
            found.append(int(trace.positions[index]))
    return min(found) if found else None


def simulate(traces: Sequence[PolicyTrace], loop_threshold: float, wrong_threshold: float, commit_threshold: float,
             patience: int, fallback_success: float, reference: float,
             alarms: Sequence[int | None] | None = None, step_threshold: float = NEVER,
             steps: Sequence[tuple[bool, float, int]] | None = None) -> dict:
    """Modeled outcome of the policy over validation traces (module docstring): accuracy, FP16 share,
    the shares of traces that committed or fell back, and the mean step rewrites. `alarms` and `steps`
    (per trace, `step_outcomes` at `step_threshold`) save recomputing them."""
    if alarms is None:
        alarms = [alarm_position(t, loop_threshold, wrong_threshold, patience) for t in traces]
    if steps is None:
        steps = step_outcomes(traces, step_threshold)
    correct = fp16 = total = 0.0
    committed = fell_back = rewrites = 0
    for trace, alarm, (repaired, step_tokens, count) in zip(traces, alarms, steps):
        fp16 += step_tokens
        rewrites += count
        if alarm is None:
            correct += fallback_success if repaired else trace.correct
            total += max(reference, step_tokens) if repaired else trace.length
            continue
        # The alarms also watch a repaired trace (its 2-bit scores stand in for the repaired trace's): a
        # commit is graded as the 2-bit trace stated the candidate, a fallback's FP16 tokens come on top
        # of the step actions, and a repaired trace's tokens are at least its step actions'.
        floor = step_tokens if repaired else 0
        best = best_candidate(trace.candidates, alarm + 1)
        if best is not None and best[1] >= commit_threshold:
            committed += 1
            correct += best[2]
            total += max(alarm + 1, floor)
        else:
            fell_back += 1
            tokens = max(reference - alarm, reference / 4)
            inherited = first_unrepaired(trace, step_threshold)  # None for a repaired trace
            correct += trace.correct if inherited is not None and inherited < alarm else fallback_success
            fp16 += tokens
            total += max(alarm, floor) + tokens
    count = max(len(traces), 1)
    return {"accuracy": correct / count, "fp16_share": fp16 / total if total else 0.0,
            "committed": committed / count, "fell_back": fell_back / count, "step_rewrites": rewrites / count}


def reference_length(traces) -> float:
    """The length a fallback is modeled to finish at: the mean length of the correct traces (of all, if none
    is correct). `traces`: anything with `length` and `correct`."""
    lengths = [t.length for t in traces if t.correct] or [t.length for t in traces]
    return float(np.mean(lengths))


def best_within_budgets(outcomes: Sequence, budgets: Sequence[float], traces: int, share, accuracy,
                        order=lambda outcome: ()) -> list[tuple[float, object]]:
    """Per budget (ascending), the choice among `outcomes` (each read by `share` and `accuracy`) with the best
    modeled accuracy within it: a gain of less than one of the `traces` validation traces is not a gain, so
    the cheapest choice within that of the best wins (then `order`). A budget below every choice's share
    gets the cheapest."""
    tolerance = (1.0 - 1e-9) / traces
    cheapest = min(map(share, outcomes))
    chosen = []
    for budget in sorted(budgets):
        within = [o for o in outcomes if share(o) <= max(budget, cheapest) + 1e-12]
        top = max(map(accuracy, within))
        near = [o for o in within if accuracy(o) >= top - tolerance]
        chosen.append((budget, min(near, key=lambda o: (share(o), -accuracy(o), *order(o)))))
    return chosen


def _threshold_grid(values: np.ndarray, steps: int) -> list[float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return [NEVER]
    quantiles = np.unique(np.quantile(values, np.linspace(0.0, 1.0, steps)))
    return sorted({NEVER, *[float(q) for q in quantiles]})


def choose_policy(traces: Sequence[PolicyTrace], loop_threshold: float, patience: int, fallback_success: float,
                  budgets: Sequence[float] = BUDGETS, steps: int = 24, use_steps: bool = False,
                  step_action: str = "check") -> dict:
    """Thresholds per FP16 budget maximising modeled accuracy within it. A modeled gain smaller than one
    validation trace's outcome (1 / traces) is not a gain: among the choices within that of the best, the
    cheapest wins (more FP16 for less than one trace is fitting the validation set's noise).
    `use_steps`: also choose the step threshold (on a coarser grid of all three), for `step_action`.

    Returns the card's `calibration.policy`: the reference length, the fallback model, and one
    `PolicyChoice` per budget, budgets ascending."""
    if not traces:
        raise ValueError("no validation traces to choose the action policy on")
    reference = reference_length(traces)
    scored_steps = np.array([s[1] for t in traces for s in t.steps], dtype=float)
    use_steps = use_steps and len(scored_steps) > 0
    if use_steps:
        steps = min(steps, 16)
    wrong_grid = _threshold_grid(np.array([sustained_peak(t.wrong, patience) for t in traces]), steps)
    commit_grid = _threshold_grid(np.array([score for t in traces for _, score, _ in t.candidates]), steps)
    step_grid = _threshold_grid(scored_steps, steps) if use_steps else [NEVER]
    alarm_sets = {w: [alarm_position(t, loop_threshold, w, patience) for t in traces] for w in wrong_grid}
    outcomes = []
    for s in step_grid:
        rewrites = step_outcomes(traces, s, step_action)
        for w in wrong_grid:
            outcomes += [(w, c, s, simulate(traces, loop_threshold, w, c, patience, fallback_success, reference,
                                            alarm_sets[w], s, rewrites))
                         for c in commit_grid]
    choices = []
    # Loop alarms alone may spend FP16 tokens; a budget below that gets the cheapest choice.
    for budget, (w, c, s, best) in best_within_budgets(outcomes, budgets, len(traces), lambda o: o[3]["fp16_share"],
                                                       lambda o: o[3]["accuracy"], lambda o: (-o[0], -o[2])):
        choices.append(PolicyChoice(budget, w, c, best["accuracy"], best["fp16_share"],
                                    best["committed"] + best["fell_back"], best["committed"],
                                    best["fell_back"], s, best["step_rewrites"]).to_dict())
    return {"reference_length": reference, "fallback_success": fallback_success, "patience": patience,
            "loop_threshold": loop_threshold, "traces": len(traces),
            "model": "detector/policy.py: no alarm keeps the trace's outcome; commit is graded; fallback "
                     "succeeds with fallback_success (after an unrepaired wrong step: the trace's own outcome) "
                     "and costs max(reference - alarm, reference / 4) FP16 tokens"
                     + (f"; handing every wrong step to FP16 ({step_action}) succeeds with fallback_success"
                        if use_steps else ""),
            "step_rewrites": use_steps,
            "step_action": step_action if use_steps else None,
            "budgets": choices}


def policy_for_budget(policy: dict, budget: float) -> dict:
    """The card's policy entry with the largest budget not above `budget` (the smallest if none is)."""
    entries = sorted(policy["budgets"], key=lambda e: e["fp16_budget"])
    chosen = entries[0]
    for entry in entries:
        if entry["fp16_budget"] <= budget + 1e-12:
            chosen = entry
    return chosen
