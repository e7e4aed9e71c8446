"""Trace labels: where and how a generated trace went wrong, computed from token ids and text alone.

Labels are model-agnostic (any tokenizer: the embedded character tokenizer or Qwen3's BPE) and
cheap to recompute, so a trace set can be relabeled with other parameters without re-collection.

Per trace (`TraceLabels`):
- `loop_onset`, `loop_period`: where a repetitive loop begins and its block length (`find_loop`);
- `budget_exhausted`: generation stopped at the token budget;
- `unclosed_think`: `</think>` was never emitted;
- `committed`: a parseable final answer after `</think>`, and the budget was not hit;
- `first_candidate_pos`: the token that completes the first answer stated while thinking (or, if
  none was, the final answer);
- `delayed_commitment`: the trace went on for more than D tokens after that token;
- `correct`: the final answer equals the gold answer (as `rescue evaluate` grades it);
- `fails_to_commit`: not `committed`;
- `candidates`: every answer stated while thinking, as `[token, correct]` pairs: the token that
  completes the stated value and whether that value equals the gold answer (graded as `correct`);
- `steps`: every arithmetic step `a op b = c` written while thinking (`inference.control.arithmetic`), as
  `[token, wrong, result_token]` triples: the token holding the break that closes the step, whether
  `c` is not `a op b` (checked from the text, no gold answer needed), and the token where `c` begins.

Per position (`position_targets`), for the probe: `loop_within_h` (inside a loop, or its onset
within the next H tokens), the trace-level `fails_to_commit`, the trace-level `ends_wrong` (the
trace will not end with a correct final answer: `not correct`), and `answer_correct`, defined only at
the capture position that first follows a candidate's completing token (will this stated answer be
correct?) and undefined (NaN) elsewhere. These last two need gold answers; they are what the learned
trigger uses to choose between committing to a candidate and falling back to FP16. `step_wrong` is
defined only at the token closing an arithmetic step (is the result just written wrong?), NaN
elsewhere: the learned trigger has FP16 rewrite a result it scores as wrong.

`label_report` summarizes a list of labels as a markdown table and PNG plots; `label_records` labels
the traces of an evaluation record and `label_shares` gives the share of traces per label.
"""

from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from inference.evaluation.answers import (  # noqa: F401  (token_char_ends: re-exported, it was defined here first)
    THINK_CLOSE, extract_final_answer, find_candidate_answers, split_thinking, token_char_ends,
)
from inference.config import LabelsConfig
from inference.control.arithmetic import find_steps
from inference.decoding.generate import FINISH_BUDGET
from inference.evaluation.grading import is_correct

# A block may carry one edited token per this many tokens (an incrementing counter, a changed
# digit); blocks shorter than this must repeat exactly, so a counter with a separator
# ("1, 2, 3, ...") is never enough to make a loop.
TOKENS_PER_EDIT = 8
# A block that carries more edits than this in every occurrence, and never occurs twice as is, is
# new content changing in step (an enumeration, a symmetric derivation), not a loop.
MAX_EDITS_PER_REPEAT = 3


@dataclass(frozen=True)
class TraceLabels:
    """The labels of one generated trace; positions are indices into its generated tokens."""

    length: int
    """Generated tokens (the EOS token included when emitted)."""
    loop_onset: int | None
    """First position of a loop (see `find_loop`); None if the trace has none."""
    loop_period: int | None
    """Tokens per repeated block of that loop; None if no loop."""
    budget_exhausted: bool
    """Generation stopped because the token budget ran out."""
    unclosed_think: bool
    """`</think>` never occurred in the generated text."""
    committed: bool
    """A parseable final answer after `</think>`, within a trace that did not hit the budget."""
    first_candidate_pos: int | None
    """Token that completes the first candidate answer inside the thinking, or the final answer
    if the thinking states none; None if neither exists."""
    delayed_commitment: bool
    """A candidate answer was available, and the trace went on for more than D tokens after it."""
    correct: bool
    """The final answer (read after `</think>`) equals the gold answer, graded as `rescue evaluate`
    grades: an answer given before the budget ran out counts even though the trace failed to commit."""
    fails_to_commit: bool
    """Not committed: the budget ran out, `</think>` never came, or no final answer parses."""
    candidates: tuple[tuple[int, bool], ...] = ()
    """Every candidate answer stated while thinking: (token completing its value, value is correct)."""
    steps: tuple[tuple[int, bool, int], ...] = ()
    """Every arithmetic step written while thinking: (token closing it, its result is wrong, token where
    the result begins)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> TraceLabels:
        """Labels written before a field existed read with its default (older labels.json files)."""
        fields = cls.__dataclass_fields__
        values = {name: record[name] for name in fields if name in record}
        if "candidates" in values:
            values["candidates"] = tuple((int(pos), bool(ok)) for pos, ok in values["candidates"])
        if "steps" in values:
            values["steps"] = tuple((int(pos), bool(wrong), int(start)) for pos, wrong, start in values["steps"])
        return cls(**values)


def find_loop(ids: Sequence[int], params: LabelsConfig) -> tuple[int, int] | None:
    """(onset, period) of the first loop in a generated token sequence, or None.

    A loop of period p (1 <= p <= P) is a stretch of tokens that agrees with itself shifted by p:
    token i equals token i + p, except for *small edits*:
    - substitutions: in every p consecutive positions of the stretch at most floor(p / 8) tokens
      differ from the token p later. So blocks shorter than 8 tokens must repeat exactly, and a
      block of 8 or more carries at least 7 unchanged tokens per edited one;
    - a token added or removed (a counter going from 9 to 10, a result one digit longer): for
      blocks of 8 or more, a stretch of period p followed at once by one of period p + 1 or
      p - 1 (starting at most floor(p / 8) + 2 tokens after the first one's last agreeing
      token) continue the same loop. A stretch shorter than half a block does not start such a
      chain, so an added or removed token may make the onset up to half a block late.
    A stretch starts and ends on agreeing tokens; the loop must cover at least R blocks (R * p
    tokens, with p its longest period: the block occurs R times in a row) and at least L tokens,
    and the block must *repeat*: somewhere in the loop one block is followed by an exact copy of
    itself (p agreeing tokens in a row), or one stretch covers R blocks in which no p consecutive
    tokens hold more than 3 edits (a block redone with a counter or a changed result). That is
    what tells a loop from an enumeration or a symmetric derivation, where indices, signs or
    variable names change in step, so that every item brings several new tokens and none is a
    copy of the one before: "2. For (3, 3, 0): (a -3)^2 + (b -3)^2 ..." / "3. For (3, -3, 0):
    (a -3)^2 + (b +3)^2 ...", "d/dx (x^2 + ... - 2x) = 2x - 2 = 0, so x = 1" / "d/dy ...", "Row 3:
    3 * 7 = 21" / "Row 4: 4 * 7 = 28", "1, 2, 3, ..., 20" or "2^1 + 2^2 + ..." are not loops;
    "Let me check step 3 again." / "... step 4 again." (one counter) and "Thus, 2:3:3 is 200:240:300."
    twice, then "Therefore, 2:3:3 is ..." are.
    `onset` is the first token of the earliest loop; `period` is its block length at the onset,
    the shortest one among loops with the same onset.

    What this means for legitimate repetition: a step re-checked once or a chain redone once (a
    block occurring twice) is not a loop, nor is a short phrase repeated ("Yes. Yes.") over fewer
    than L tokens. A whole chain done three times in a row (as is, or with at most 3 edited tokens
    per pass, e.g. a changed result) *is* a loop, by definition: with R = 3 that is where a trace has stopped
    making progress, even if the model would have stopped on its own after it.

    Cost: O(n * P) vectorized comparisons, about 30-60 ms for 8k tokens (2-core CPU).
    """
    tokens = np.asarray(ids, dtype=np.int64)
    best: tuple[int, int] | None = None
    edited: list[tuple[int, int, int, bool]] = []  # (first, last, period, verbatim) of stretches that may chain
    for period in range(1, min(params.max_period, len(tokens) // params.min_repeats) + 1):
        firsts, lasts, verbatim = _stretches(tokens, period, params.min_repeats)
        if period >= TOKENS_PER_EDIT:
            # Stretches shorter than half a block are left out of chains: they would be many in
            # repetitive text, and a chain starting after one begins at most half a block late.
            piece = lasts - firsts + 1 >= max(TOKENS_PER_EDIT, period // 2)
            edited.extend(zip(firsts[piece].tolist(), lasts[piece].tolist(), [period] * int(piece.sum()),
                              verbatim[piece].tolist()))
            continue
        need = max(params.min_repeats * period, params.min_span)
        long_enough = np.flatnonzero(lasts + period - firsts + 1 >= need)
        if len(long_enough):
            best = min(best or (len(tokens), 0), (int(firsts[long_enough[0]]), period))
    chained = _first_chained_loop(edited, params)
    if chained is not None:
        best = min(best or chained, chained)
    return best


def _stretches(tokens: np.ndarray, period: int, min_repeats: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal stretches that agree with themselves shifted by `period` within the substitution
    budget of `find_loop` (no `period` consecutive comparisons hold more than floor(period / 8)
    disagreements), as (first, last) comparison positions, both agreeing: token `first` equals
    token `first + period`. Such a stretch covers tokens first .. last + period. The third array
    says whether the stretch holds a verbatim repeat: `period` agreeing comparisons in a row (one
    block followed by an exact copy of itself)."""
    differs = tokens[:-period] != tokens[period:]  # differs[i]: token i vs token i + period
    edits = period // TOKENS_PER_EDIT
    mismatches = np.flatnonzero(differs)
    # A stretch may not hold edits + 1 disagreements within fewer than `period` positions: every
    # such crowded group splits the stretches, the left one ends before its last member and the
    # right one starts after its first.
    spread = mismatches[edits:] - mismatches[: max(len(mismatches) - edits, 0)]
    crowded = np.flatnonzero(spread < period)
    starts = np.concatenate(([0], mismatches[crowded] + 1))
    stops = np.concatenate((mismatches[crowded + edits], [len(differs)]))  # exclusive
    agree = np.flatnonzero(~differs)
    first_index = np.searchsorted(agree, starts)
    last_index = np.searchsorted(agree, stops) - 1
    keep = last_index >= first_index
    firsts, lasts = agree[first_index[keep]], agree[last_index[keep]]
    if not len(firsts):
        return firsts, lasts, np.zeros(0, dtype=bool)
    # Runs of agreeing comparisons never cross a disagreement, so a run of `period` lies inside
    # one stretch: the stretch holding its first comparison.
    bounds = np.concatenate(([-1], mismatches, [len(differs)]))
    long_run = np.flatnonzero(np.diff(bounds) - 1 >= period)
    run_starts = bounds[long_run] + 1
    holder = np.searchsorted(firsts, run_starts, side="right") - 1
    repeats = np.zeros(len(firsts), dtype=bool)
    inside = (holder >= 0) & (run_starts <= lasts[np.maximum(holder, 0)])
    repeats[holder[inside]] = True
    # Or: no `period` consecutive comparisons of the stretch hold more than MAX_EDITS_PER_REPEAT
    # disagreements (a block redone with a changed result or two).
    owner = np.searchsorted(firsts, mismatches, side="right") - 1
    owned = (owner >= 0) & (mismatches <= lasts[np.maximum(owner, 0)])
    crowd = np.zeros(len(firsts), dtype=np.int64)
    if owned.any():
        index = np.flatnonzero(owned)
        ends = np.minimum(mismatches[index] + period, lasts[owner[index]] + 1)
        np.maximum.at(crowd, owner[index], np.searchsorted(mismatches, ends) - index)
    few_edits = (crowd <= MAX_EDITS_PER_REPEAT) & (lasts + period - firsts + 1 >= min_repeats * period)
    return firsts, lasts, repeats | few_edits


def _first_chained_loop(stretches: list[tuple[int, int, int, bool]], params: LabelsConfig) -> tuple[int, int] | None:
    """Earliest (onset, period) of a loop made of one stretch or of stretches whose periods
    differ by one token and that follow each other (`find_loop`, added or removed tokens); the
    loop must hold a verbatim repeat somewhere (`find_loop`, enumerations)."""
    stretches.sort()
    # Per stretch, the loop it ends: (onset, period at onset, longest period so far, verbatim so far).
    chains: list[tuple[int, int, int, bool]] = []
    by_period: dict[int, list[int]] = {}
    best = None
    for index, (first, last, period, verbatim) in enumerate(stretches):
        chain = (first, period, period, verbatim)
        for neighbour in (period - 1, period + 1):
            gap = max(period, neighbour) // TOKENS_PER_EDIT + 2
            for before in by_period.get(neighbour, ()):
                b_first, b_last, _, _ = stretches[before]
                if b_first < first <= b_last + gap and b_last < last and chains[before][0] < chain[0]:
                    onset, onset_period, longest, seen = chains[before]
                    chain = (onset, onset_period, max(longest, period), seen or verbatim)
        chains.append(chain)
        by_period.setdefault(period, []).append(index)
        onset, onset_period, longest, seen = chain
        if seen and last + period - onset + 1 >= max(params.min_repeats * longest, params.min_span):
            best = min(best or (onset, onset_period), (onset, onset_period))
    return best


def _token_at(token_ends: Sequence[int], char_end: int) -> int:
    """Index of the token whose text completes the characters before `char_end`."""
    return min(bisect.bisect_left(token_ends, char_end), len(token_ends) - 1)


def label_trace(
    generated_ids: Sequence[int],
    text: str,
    token_ends: Sequence[int],
    finish_reason: str,
    gold: str,
    params: LabelsConfig,
) -> TraceLabels:
    """All labels of one trace.

    `text` is the decoded generated text and `token_ends[i]` the character offset in it where
    token i ends (`token_char_ends`); `finish_reason` is the decoding loop's (`eos`, `budget`,
    `forced`); `gold` is the reference answer.
    """
    if len(token_ends) != len(generated_ids):
        raise ValueError(f"token_ends has {len(token_ends)} offsets for {len(generated_ids)} generated tokens")
    length = len(generated_ids)
    loop = find_loop(generated_ids, params)
    budget_exhausted = finish_reason == FINISH_BUDGET
    _, _, closed = split_thinking(text)
    final_answer = extract_final_answer(text)
    committed = final_answer is not None and not budget_exhausted

    first_candidate_pos = None
    candidates = find_candidate_answers(text)
    if candidates:
        answer_end = candidates[0].end
    elif final_answer is not None:
        answer_end = text.find(final_answer, text.find(THINK_CLOSE) + len(THINK_CLOSE)) + len(final_answer)
    else:
        answer_end = None
    if answer_end is not None and length:
        first_candidate_pos = _token_at(token_ends, answer_end)

    delayed = first_candidate_pos is not None and length - 1 - first_candidate_pos > params.commit_delay
    stated = tuple((_token_at(token_ends, c.end), is_correct(c.text, gold)) for c in candidates) if length else ()
    thinking_end = text.find(THINK_CLOSE)
    steps = tuple((_token_at(token_ends, s.end + 1), s.wrong, _token_at(token_ends, s.result_start + 1))
                  for s in find_steps(text if thinking_end < 0 else text[:thinking_end])) if length else ()
    return TraceLabels(
        length=length,
        loop_onset=None if loop is None else loop[0],
        loop_period=None if loop is None else loop[1],
        budget_exhausted=budget_exhausted,
        unclosed_think=not closed,
        committed=committed,
        first_candidate_pos=first_candidate_pos,
        delayed_commitment=delayed,
        correct=is_correct(final_answer, gold),
        fails_to_commit=not committed,
        candidates=stated,
        steps=steps,
    )


def position_targets(labels: TraceLabels, horizon: int) -> tuple[np.ndarray, bool]:
    """The probe's targets for one trace: `loop_within_h`, a bool array over generated positions
    (True from H tokens before the loop onset on, i.e. inside the loop or about to enter it), and
    the trace-level `fails_to_commit`, the same at every position."""
    positions = np.arange(labels.length)
    if labels.loop_onset is None:
        loop_within_h = np.zeros(labels.length, dtype=bool)
    else:
        loop_within_h = positions >= labels.loop_onset - horizon
    return loop_within_h, labels.fails_to_commit


def candidate_targets(labels: TraceLabels, positions: np.ndarray) -> np.ndarray:
    """`answer_correct` at captured `positions` (sorted generated indices): at the first captured
    position at or after each candidate's completing token, 1.0 if that candidate is correct and 0.0
    if not; NaN at every other position (no target there). Where two candidates share a position,
    the later one counts, as the trigger scores what was stated last."""
    targets = np.full(len(positions), np.nan, dtype=np.float32)
    for token, correct in labels.candidates:
        index = int(np.searchsorted(positions, token))
        if index < len(positions):
            targets[index] = float(correct)
    return targets


def step_targets(labels: TraceLabels, positions: np.ndarray) -> np.ndarray:
    """`step_wrong` at captured `positions` (sorted generated indices): 1.0 / 0.0 at the position of the
    token closing each arithmetic step (its result is wrong / right), NaN elsewhere. Steps whose closing
    token was not captured get no target (trace sets collected before steps were captured densely)."""
    targets = np.full(len(positions), np.nan, dtype=np.float32)
    for token, wrong, _ in labels.steps:
        index = int(np.searchsorted(positions, token))
        if index < len(positions) and int(positions[index]) == token:
            targets[index] = float(wrong)
    return targets


# Rates reported for each label, in table order.
_FLAGS = {
    "loop": lambda t: t.loop_onset is not None,
    "budget_exhausted": lambda t: t.budget_exhausted,
    "unclosed_think": lambda t: t.unclosed_think,
    "committed": lambda t: t.committed,
    "fails_to_commit": lambda t: t.fails_to_commit,
    "has_candidate": lambda t: t.first_candidate_pos is not None,
    "delayed_commitment": lambda t: t.delayed_commitment,
    "correct": lambda t: t.correct,
    "correct_candidate": lambda t: any(ok for _, ok in t.candidates),
    "wrong_step": lambda t: any(wrong for _, wrong, _ in t.steps),
    "loop_or_fails_to_commit": lambda t: _is_failing(t),  # defined below
}


def _is_failing(labels: TraceLabels) -> bool:
    return labels.fails_to_commit or labels.loop_onset is not None


def _distribution(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = np.asarray(sorted(values), dtype=float)
    return {
        "count": len(values),
        "mean": float(ordered.mean()),
        "min": float(ordered[0]),
        "p10": float(np.percentile(ordered, 10)),
        "median": float(statistics.median(ordered)),
        "p90": float(np.percentile(ordered, 90)),
        "max": float(ordered[-1]),
    }


def label_records(records: Sequence[dict], tokenizer, params: LabelsConfig) -> list[TraceLabels]:
    """Labels of the traces of an evaluation record (the rows of `rescue evaluate`'s `records.jsonl`).

    A row keeps the generated text, not its token ids, so the text is tokenized again (with the EOS
    token after it where generation stopped there). With the embedded character tokenizer that gives
    back the generated ids; with a BPE tokenizer positions can shift by a token or so.
    """
    labels = []
    for row in records:
        ids = tokenizer.encode(row["text"], add_special_tokens=False)
        if row["finish_reason"] == "eos" and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        labels.append(label_trace(ids, text, token_char_ends(tokenizer, ids), row["finish_reason"], row["gold"], params))
    return labels


def label_shares(labels: Sequence[TraceLabels]) -> dict[str, float]:
    """Share of the traces carrying each label (`label_report`'s rates), plus `loop_or_fails_to_commit`."""
    total = len(labels)
    shares = {name: sum(flag(t) for t in labels) / total if total else 0.0 for name, flag in _FLAGS.items()}
    shares["loop_or_fails_to_commit"] = sum(_is_failing(t) for t in labels) / total if total else 0.0
    return shares


def label_report(labels: list[TraceLabels], out_dir: str | Path, excerpts: Sequence[str] = (),
                 notes: Sequence[str] = ()) -> dict[str, Any]:
    """Counts and rates per label, loop onset and period distributions, and trace lengths of
    healthy vs failing traces (failing: fails to commit or loops).

    Writes `label-report.md` (with `notes`, lines under the title, and `excerpts`, a few loops as
    `loop_excerpt` shows them) and the plots `loop-onsets.png`, `loop-periods.png` and
    `trace-lengths.png` into `out_dir`; returns the same numbers as a nested dict.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = len(labels)
    counts = {name: sum(flag(t) for t in labels) for name, flag in _FLAGS.items()}
    shares = label_shares(labels)
    rates = {name: shares[name] for name in _FLAGS}
    onsets = [t.loop_onset for t in labels if t.loop_onset is not None]
    periods = [t.loop_period for t in labels if t.loop_period is not None]
    relative_onsets = [t.loop_onset / t.length for t in labels if t.loop_onset is not None and t.length]
    healthy = [t.length for t in labels if not _is_failing(t)]
    failing = [t.length for t in labels if _is_failing(t)]
    summary = {
        "traces": total,
        "counts": counts,
        "rates": rates,
        "loop_onset": _distribution(onsets),
        "loop_onset_fraction_of_length": _distribution(relative_onsets),
        "loop_period": _distribution(periods),
        "length_healthy": _distribution(healthy),
        "length_failing": _distribution(failing),
    }

    rows = ["| label | traces | rate |", "| --- | ---: | ---: |"]
    rows += [f"| {name} | {counts[name]} | {rates[name]:.1%} |" for name in _FLAGS]
    stats = ["| distribution (tokens) | count | mean | p10 | median | p90 | max |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("loop_onset", "loop_period", "length_healthy", "length_failing"):
        dist = summary[name]
        if dist["count"]:
            stats.append(f"| {name} | {dist['count']} | {dist['mean']:.1f} | {dist['p10']:.0f} | "
                         f"{dist['median']:.0f} | {dist['p90']:.0f} | {dist['max']:.0f} |")
        else:
            stats.append(f"| {name} | 0 | - | - | - | - | - |")
    report = ["# Label report", "", f"{total} traces; failing = fails to commit or loops.", "", *notes,
              *([""] if notes else []), *rows, "", *stats, ""]
    if excerpts:
        report += ["## What the loops look like", "", *excerpts]
    (out / "label-report.md").write_text("\n".join(report))

    def histogram(path: str, groups: dict[str, list[int]], xlabel: str, title: str) -> None:
        figure, axes = plt.subplots(figsize=(7, 4))
        present = {name: values for name, values in groups.items() if values}
        if present:
            every = [v for values in present.values() for v in values]
            bins = np.histogram_bin_edges(every, bins=min(40, max(5, len(set(every)))))
            for name, values in present.items():
                axes.hist(values, bins=bins, alpha=0.6, label=f"{name} ({len(values)})")
            if len(groups) > 1:
                axes.legend()
        else:
            axes.text(0.5, 0.5, "no traces", ha="center", va="center", transform=axes.transAxes)
        axes.set_xlabel(xlabel)
        axes.set_ylabel("traces")
        axes.set_title(title)
        figure.tight_layout()
        figure.savefig(out / path, dpi=120)
        plt.close(figure)

    histogram("loop-onsets.png", {"looping": onsets}, "loop onset (generated token index)",
              f"Loop onsets ({len(onsets)} of {total} traces loop)")
    histogram("loop-periods.png", {"looping": periods}, "loop period (tokens per repeated block)",
              "Loop periods")
    histogram("trace-lengths.png", {"healthy": healthy, "failing": failing}, "generated tokens",
              "Trace lengths: healthy vs failing (fails to commit or loops)")
    return summary


def loop_extent(ids: Sequence[int], onset: int, period: int) -> int:
    """Tokens from `onset` over which the loop keeps repeating: its stretch at `period`, continued
    (as `find_loop` chains them) by stretches of a period one or two tokens off that begin before
    the covered part ends."""
    tokens = np.asarray(ids, dtype=np.int64)
    if period <= 0 or onset + 2 * period > len(tokens):
        return len(tokens) - onset
    periods = [q for q in (period, period - 1, period + 1, period - 2, period + 2) if q >= 1]
    stretches = {q: _stretches(tokens, q)[:2] for q in periods}
    end = onset + period
    while True:
        grown = end
        for q, (firsts, lasts) in stretches.items():
            reach = firsts <= end + q // TOKENS_PER_EDIT + 2 - q
            covering = reach & (lasts + q + 1 > end) & (lasts + q >= onset)
            if covering.any():
                grown = max(grown, int((lasts[covering] + q + 1).max()))
        if grown == end:
            return min(end, len(tokens)) - onset
        end = grown


def loop_excerpt(text: str, token_ends: Sequence[int], ids: Sequence[int], labels: TraceLabels, title: str,
                 context_chars: int = 240, blocks_shown: int = 3) -> str:
    """Markdown showing one labeled loop for checking by eye: the text before the onset, then the
    first occurrences of the repeated block, each opened by a marker `⟦k⟧` (its k-th occurrence),
    and how many occurrences the loop holds in all. Empty when the trace has no loop."""
    if labels.loop_onset is None or not token_ends:
        return ""
    onset, period = labels.loop_onset, labels.loop_period
    span = loop_extent(ids, onset, period)
    occurrences = span / period
    start_char = lambda token: 0 if token <= 0 else token_ends[min(token, len(token_ends)) - 1]  # noqa: E731
    begin = start_char(onset)
    pieces = [text[max(0, begin - context_chars) : begin]]
    for k in range(min(blocks_shown, math.ceil(occurrences))):
        first = start_char(onset + k * period)
        last = start_char(min(onset + (k + 1) * period, onset + span))
        pieces.append(f"⟦{k + 1}⟧{text[first:last]}")
    shown_end = start_char(min(onset + blocks_shown * period, onset + span))
    after = text[shown_end : shown_end + context_chars // 2]
    body = "".join(pieces) + ("⟦…⟧" if occurrences > blocks_shown else "") + after
    fence = "~~~~"
    while fence in body:
        fence += "~"
    return "\n".join([
        f"### {title}",
        "",
        f"Loop from token {onset} (character {begin}): a block of {period} tokens, about {occurrences:.1f} "
        f"occurrences in a row ({span} tokens); `⟦k⟧` opens its k-th occurrence.",
        "",
        f"{fence}text",
        body,
        fence,
        "",
    ])
