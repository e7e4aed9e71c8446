"""Triggers: what the rescue controller consults while a 2-bit trace is being written.

A trigger watches the live sequences of a batch through the step hook (newest token, its generated
position, the hidden states and top-token probability of the same forward pass) and raises an
`Alarm` for a sequence that is going wrong. The controller turns an alarm into one of the decisions
`commit` or `fallback` with `decide` (shared by both triggers, so they differ only in *when* they
fire), and asks the trigger before reasoning starts whether to `plan`.

- `RuleTrigger`, the paper's controls reconstructed: a repeated-n-gram loop check over a recent window
  (the newest n tokens occur `count` times within the last `window` tokens) and a budget check (the
  trace has used `budget_fraction` of its budget and is still thinking); planning always or never.
  Its onset estimate, where a fallback cuts back to, is the start of the n-gram's second occurrence in
  the window: one period of the repeated block is kept.
- `LearnedTrigger`, a detector artifact's probe: at every position on the detector's capture grid
  (generated position % stride == 0, what calibration scored) each alarm head's probability is compared
  with its threshold, and an alarm goes off after `patience` consecutive grid steps at or above it. Its
  onset estimate is the first step of that run (`loop_within_h` predicts a loop *ahead*, and
  `ends_wrong` rises where the trace starts to go wrong, so the tokens before the run are kept).
  Planning is decided from the `fails_to_commit` risk of the first `plan_probe_tokens` states against
  the card's planning threshold.

What an alarm does is the trigger's `select`: by default `decide` (commit to the earliest candidate
when one exists before the onset, else fall back). A detector whose card holds a calibrated action
policy (`detector.policy`: the `ends_wrong` and `answer_correct` heads) selects instead: the
`ends_wrong` threshold is the one chosen for the user's FP16 budget, every candidate answer stated
before the onset is scored by `answer_correct` (its score at the first grid step after it), and the
trace commits to the best one if that score reaches the policy's commit threshold, else falls back to
FP16 from the onset. Where the policy also holds a `step_threshold` (a trained `step_wrong` head), the
token closing each arithmetic step (`inference.control.arithmetic`) is scored as well, on or off the grid, and
a score at or above it raises a `step_wrong` alarm whose onset is where the step's result begins and
whose FP16 span ends at the step's break (`Alarm.span_to_break`): with the card's `check` step action
FP16 checks the result and rewrites it from the first token it rejects (`Alarm.check`), with `rewrite`
it rewrites the result; then it hands back. Older two-head detectors keep the default (`policy_name` says which ran).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Sequence

import torch

CONTINUE, PLAN, COMMIT, FALLBACK = "continue", "plan", "commit", "fallback"
_STEP_TOKENS = 48
"""Newest tokens whose text the step check reads (a step line is at most a few dozen characters)."""


@dataclass(frozen=True)
class Alarm:
    """A trigger's verdict on one sequence: why, at which generated position, and where the bad
    stretch is estimated to begin (a fallback keeps the tokens before `onset`)."""

    reason: str
    position: int
    onset: int
    span_to_break: bool = False
    """A fallback for this alarm writes FP16 only up to the next break (`inference.control.arithmetic.BREAKS`)
    and hands back: a step rewrite."""
    check: bool = False
    """(With `span_to_break`) FP16 first checks the tokens from `onset` to the alarm in one forward pass and
    rewrites only from the first one it rejects; a result it accepts stays as the 2-bit model wrote it."""


def decide(alarm: Alarm, has_candidate: bool, on_alarm: str, fallback_available: bool) -> str:
    """Commit or fall back: `auto` commits when an answer candidate exists before the onset (the
    trace already found an answer and is only failing to stop), else hands over to FP16."""
    if on_alarm == COMMIT or not fallback_available:
        return COMMIT
    if on_alarm == FALLBACK:
        return FALLBACK
    return COMMIT if has_candidate else FALLBACK


class Trigger:
    """The interface. Sequences are the controller's indices; positions are generated-token indices."""

    name = "none"
    layers: tuple[int, ...] = ()
    policy_name = "earliest-candidate"
    """How `select` chooses an action (recorded with each evaluation)."""

    def select(self, seq: int, alarm: Alarm, candidate_tokens: Sequence[int], on_alarm: str,
               fallback_available: bool) -> tuple[str, int | None]:
        """The action for an alarm and, for a commit, the index of the candidate to commit to (None: let
        the model answer). `candidate_tokens` are the generated positions completing each candidate answer
        stated before the onset, in order."""
        action = decide(alarm, bool(candidate_tokens), on_alarm, fallback_available)
        return action, (0 if action == COMMIT and candidate_tokens else None)

    def wants_plan(self, seq: int) -> bool:
        """Whether the FP16 model should plan this trace (asked once, before reasoning)."""
        return False

    @property
    def plan_probe_tokens(self) -> int:
        """2-bit tokens to generate and watch before `wants_plan` is asked (0: ask before any)."""
        return 0

    def restart(self, seq: int, generated: Sequence[int]) -> None:
        """(Re)start watching `seq`, whose generated tokens so far are `generated` (after a cut, a plan
        or an FP16 span: the state is rebuilt from the tokens the trace now has)."""

    def observe(self, seqs: Sequence[int], positions: Sequence[int], tokens: torch.Tensor,
                hidden: dict[int, torch.Tensor], top_prob: torch.Tensor | None) -> list[Alarm | None]:
        """One decoding step of the watched sequences; an alarm or None per sequence."""
        return [None] * len(seqs)


class NoTrigger(Trigger):
    """Never plans, never alarms (naive decoding)."""


class AlwaysPlan(Trigger):
    """Plans every trace, never alarms (the `plan-only` method)."""

    name = "plan-only"

    def wants_plan(self, seq: int) -> bool:
        return True


@dataclass
class _NgramState:
    tokens: list[int] = field(default_factory=list)
    ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)


class RuleTrigger(Trigger):
    """The repeated-n-gram loop check and the budget check (see the module docstring)."""

    name = "rule"

    def __init__(self, ngram: int, window: int, count: int, budget: int, budget_fraction: float, plan: bool,
                 think_close_id: int | None):
        if window < ngram:
            raise ValueError(f"rule window ({window}) must be at least the n-gram length ({ngram})")
        self.ngram, self.window, self.count, self.plan = ngram, window, count, plan
        self.budget_limit = int(budget * budget_fraction) if budget_fraction < 1.0 else None
        self.think_close_id = think_close_id
        self.state: dict[int, _NgramState] = {}

    def wants_plan(self, seq: int) -> bool:
        return self.plan

    def restart(self, seq: int, generated: Sequence[int]) -> None:
        state = self.state[seq] = _NgramState()
        for token in generated:
            self._push(state, int(token))

    def _push(self, state: _NgramState, token: int) -> tuple[int, list[int]]:
        """Append a token; return how often the newest n-gram occurs in the window, and its end positions."""
        state.tokens.append(token)
        t = len(state.tokens) - 1
        if t < self.ngram - 1:
            return 0, []
        ends = state.ends.setdefault(tuple(state.tokens[t - self.ngram + 1 :]), [])
        ends.append(t)
        first = bisect.bisect_left(ends, t - self.window + self.ngram)
        return len(ends) - first, ends[first:]

    def observe(self, seqs, positions, tokens, hidden, top_prob):
        alarms: list[Alarm | None] = []
        for seq, position, token in zip(seqs, positions, tokens.tolist()):
            state = self.state.setdefault(seq, _NgramState())
            occurrences, ends = self._push(state, token)
            if occurrences >= self.count:
                alarms.append(Alarm("loop", position, ends[1] - self.ngram + 1))
            elif self.budget_limit is not None and position + 1 >= self.budget_limit:
                alarms.append(Alarm("budget", position, position + 1))
            else:
                alarms.append(None)
        return alarms


@dataclass
class _ProbeState:
    features: object = None
    """The sequence's `StreamingFeatures` (normalised states and the running mean of its capture grid)."""
    runs: list[int] = field(default_factory=list)
    run_starts: list[int] = field(default_factory=list)
    early_risk: float = 0.0
    grid_positions: list[int] = field(default_factory=list)
    """Generated positions scored so far, with their `answer_correct` scores (learned action policy)."""
    answer_scores: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    """Decoded text of the newest tokens (step rewrites: what the last token closed)."""


class LearnedTrigger(Trigger):
    """A detector artifact's heads against their calibrated thresholds (see the module docstring)."""

    name = "learned"

    def __init__(self, detector, plan_probe_tokens: int = 1, fp16_budget: float | None = None, tokenizer=None):
        from detector.calibration import NEVER
        from detector.policy import policy_for_budget
        from detector.probe import ALARM_HEADS

        self.detector = detector
        self.heads = list(detector.heads)
        self.layers = tuple(detector.recipe.layers)
        calibration = detector.card["calibration"]
        self.stride = int(calibration["stride"])
        self.patience = detector.patience
        thresholds = {h: (detector.thresholds[h] if h in ALARM_HEADS else NEVER) for h in self.heads}
        plan = calibration.get("plan") or {}
        # Older cards have no planning threshold: plan where the fails_to_commit head would alarm.
        self.plan_threshold = float(plan.get("threshold", detector.thresholds["fails_to_commit"]))
        self.policy = None
        if fp16_budget is not None and detector.has_decision_heads:
            self.policy = policy_for_budget(calibration["policy"], fp16_budget)
            self.policy_name = f"learned-selection@{self.policy['fp16_budget']:g}"
            thresholds["ends_wrong"] = self.policy["wrong_threshold"]
            # A plan spends FP16 tokens on every trace it fires on, and validation traces (all 2-bit, none
            # planned) hold no evidence that it helps: under the action policy the trigger never plans.
            self.plan_threshold = NEVER
        elif "ends_wrong" in thresholds:
            thresholds["ends_wrong"] = NEVER  # without the action policy, the old policy's alarms only
        self.answer_head = self.heads.index("answer_correct") if "answer_correct" in self.heads else None
        # Step rewrites: a policy with a step threshold, the head, and a tokenizer to read the steps with.
        self.tokenizer, self.step_head, self.step_threshold = tokenizer, None, None
        if (self.policy is not None and tokenizer is not None and "step_wrong" in self.heads
                and float(self.policy.get("step_threshold", NEVER)) < NEVER):
            self.step_head, self.step_threshold = self.heads.index("step_wrong"), float(self.policy["step_threshold"])
        # Cards calibrated before the step check rewrote every flagged result (and were calibrated for that).
        self.step_check = (calibration.get("policy") or {}).get("step_action") == "check"
        self.thresholds = torch.tensor([thresholds[h] for h in self.heads])
        self._plan_probe_tokens = 0 if self.policy is not None else plan_probe_tokens  # nothing to decide
        self.state: dict[int, _ProbeState] = {}

    @property
    def plan_probe_tokens(self) -> int:
        return self._plan_probe_tokens

    def wants_plan(self, seq: int) -> bool:
        state = self.state.get(seq)
        return state is not None and state.early_risk >= self.plan_threshold

    def restart(self, seq: int, generated: Sequence[int]) -> None:
        # After a cut or an FP16 span the alarm runs start over; the early risk, the running mean's grid
        # states and the candidate scores of the tokens the trace keeps stay.
        old = self.state.get(seq)
        self.state[seq] = fresh = self._fresh_state(old.early_risk if old else 0.0)
        if old is not None:
            kept = bisect.bisect_left(old.grid_positions, len(generated))
            fresh.grid_positions, fresh.answer_scores = old.grid_positions[:kept], old.answer_scores[:kept]
            fresh.features = old.features.truncated(len(generated))
        if self.step_head is not None:
            fresh.pieces = [self.tokenizer.decode([int(t)], skip_special_tokens=True) for t in generated[-_STEP_TOKENS:]]

    def _fresh_state(self, early_risk: float = 0.0) -> _ProbeState:
        return _ProbeState(features=self.detector.streaming(), runs=[0] * len(self.heads),
                           run_starts=[0] * len(self.heads), early_risk=early_risk)

    def _closed_steps(self, seqs, positions, tokens) -> dict[int, int]:
        """Rows whose newest token closes an arithmetic step -> generated position where its result begins."""
        from inference.control.arithmetic import step_at_end, token_at_char

        closed = {}
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
            state = self.state.setdefault(seq, self._fresh_state())
            state.pieces = [*state.pieces[-(_STEP_TOKENS - 1):], self.tokenizer.decode([token], skip_special_tokens=True)]
            step = step_at_end("".join(state.pieces))
            if step is not None:
                closed[i] = token_at_char(state.pieces, step.result_start, positions[i])
        return closed

    @torch.no_grad()
    def observe(self, seqs, positions, tokens, hidden, top_prob):
        alarms: list[Alarm | None] = [None] * len(seqs)
        closed = self._closed_steps(seqs, positions, tokens) if self.step_head is not None else {}
        on_grid = [i for i, position in enumerate(positions) if position % self.stride == 0]
        scored = sorted({*on_grid, *closed})
        if not scored:
            return alarms
        states = torch.stack([hidden[layer][scored] for layer in self.layers], dim=1).float().cpu()
        rows = []
        for j, i in enumerate(scored):
            state = self.state.setdefault(seqs[i], self._fresh_state())
            rows.append(state.features.step(positions[i], states[j : j + 1]))
        all_scores = self.detector.probe(torch.cat(rows)).sigmoid()
        for j, i in enumerate(scored):
            if i in closed and float(all_scores[j, self.step_head]) >= self.step_threshold:
                alarms[i] = Alarm("step_wrong", positions[i], closed[i], span_to_break=True, check=self.step_check)
        grid_rows = [j for j, i in enumerate(scored) if positions[i] % self.stride == 0]
        scores = all_scores[grid_rows]
        above = scores >= self.thresholds
        for j, i in enumerate(on_grid):
            seq, position = seqs[i], positions[i]
            state = self.state[seq]
            if position < self._plan_probe_tokens:
                state.early_risk = max(state.early_risk, float(scores[j, self.heads.index("fails_to_commit")]))
            if self.policy is not None:
                state.grid_positions.append(position)
                state.answer_scores.append(float(scores[j, self.answer_head]))
            for h, head in enumerate(self.heads):
                if above[j, h]:
                    if state.runs[h] == 0:
                        state.run_starts[h] = position
                    state.runs[h] += 1
                else:
                    state.runs[h] = 0
            for h, head in enumerate(self.heads):
                if state.runs[h] >= self.patience and alarms[i] is None:
                    onset = state.run_starts[h] if head in ("loop_within_h", "ends_wrong") else position + 1
                    alarms[i] = Alarm(head, position, onset)
        return alarms

    def select(self, seq, alarm, candidate_tokens, on_alarm, fallback_available):
        if alarm.span_to_break:
            return FALLBACK, None
        if self.policy is None or on_alarm != "auto":
            return super().select(seq, alarm, candidate_tokens, on_alarm, fallback_available)
        state = self.state.get(seq)
        best, best_score = None, None
        for index, token in enumerate(candidate_tokens):
            step = bisect.bisect_left(state.grid_positions, token) if state else 0
            if state is None or step >= len(state.grid_positions):
                continue  # stated after the last scored step: no score for it
            score = state.answer_scores[step]
            if best_score is None or score >= best_score:
                best, best_score = index, score
        if best is not None and best_score >= self.policy["commit_threshold"]:
            return COMMIT, best
        if fallback_available:
            return FALLBACK, None
        return COMMIT, (best if best is not None else (0 if candidate_tokens else None))
