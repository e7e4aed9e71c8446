"""The rule trigger replayed on labeled traces, from token ids alone: where its loop check first
fires, how often it fires on healthy traces (its false-alarm rate), and rule settings calibrated on
healthy traces for a target false-alarm rate.

The loop check is `inference.control.triggers.RuleTrigger`'s: at generated position t it fires when the
n-gram ending at t occurs `count` times within the last `window` tokens (t included). Replaying it
needs no model, so a trace set, an evaluation record or another harness's JSONL can all be scored.
A *healthy* trace is one without a labeled loop that commits (`trigger_outcomes`' definition), so
the false-alarm rate is the share of healthy traces the rule would have cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

# The grid `calibrate_rule` searches by default: n-gram lengths, windows and counts.
NGRAMS = (16, 24, 32, 48, 64)
WINDOWS = (256, 512, 1024)
COUNTS = (3, 4, 5, 6, 8)


@dataclass(frozen=True)
class RuleSetting:
    """The loop check's three numbers (`rescue.rule_ngram`, `rule_window`, `rule_count`)."""

    ngram: int
    window: int
    count: int

    def describe(self) -> str:
        return f"{self.ngram}-gram {self.count}x within {self.window} tokens"


def rule_setting(control) -> RuleSetting:
    """The setting a config's `rescue` section gives the rule trigger."""
    return RuleSetting(control.rule_ngram, control.rule_window, control.rule_count)


def ngram_gaps(ids: Sequence[int], ngram: int, earlier: int) -> np.ndarray:
    """gaps[k - 1, t]: tokens between the end of the k-th earlier occurrence of the n-gram ending at
    position t and t (k = 1 .. `earlier`); a large number where there is none. The loop check fires
    at t for (window, count) iff gaps[count - 2, t] <= window - ngram."""
    tokens = np.asarray(ids, dtype=np.int64)
    never = np.iinfo(np.int64).max // 4
    gaps = np.full((earlier, len(tokens)), never, dtype=np.int64)
    if len(tokens) < ngram:
        return gaps
    group = _ngram_hashes(tokens, ngram)
    order = np.lexsort((np.arange(len(group)), group))  # by n-gram, then by position
    grouped, starts = group[order], order
    for k in range(1, earlier + 1):
        same = grouped[k:] == grouped[:-k]
        gaps[k - 1, starts[k:][same] + ngram - 1] = (starts[k:] - starts[:-k])[same]
    return gaps


def _ngram_hashes(tokens: np.ndarray, ngram: int) -> np.ndarray:
    """One 64-bit polynomial hash per n-gram (wrapping arithmetic): equal n-grams hash equal, and
    two different ones collide with probability about 2^-64, far below one in a trace set."""
    count = len(tokens) - ngram + 1
    values = tokens.astype(np.uint64) + np.uint64(1)
    hashes = np.zeros(count, dtype=np.uint64)
    base = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for offset in range(ngram):
            hashes = hashes * base + values[offset : offset + count]
    return hashes


def first_rule_alarm(ids: Sequence[int], setting: RuleSetting, gaps: np.ndarray | None = None) -> int | None:
    """The generated position at which the loop check first fires (None if it never does)."""
    if gaps is None:
        gaps = ngram_gaps(ids, setting.ngram, setting.count - 1)
    fired = np.flatnonzero(gaps[setting.count - 2] <= setting.window - setting.ngram)
    return int(fired[0]) if len(fired) else None


def _healthy(labels) -> bool:
    return labels.loop_onset is None and not labels.fails_to_commit


def rule_outcomes(traces: Iterable[tuple[Sequence[int], Any]], setting: RuleSetting) -> dict[str, Any]:
    """The loop check replayed on (token ids, `TraceLabels`) pairs: loops caught, false-alarm rate on
    healthy traces (`false_alarm_rate`, with `false_alarms` of `healthy`), and alarm minus onset on
    the loops caught (`median_lead_tokens`; negative = before the labeled onset)."""
    from training.fit import trigger_outcomes

    alarms, labels = [], []
    for ids, label in traces:
        alarms.append(first_rule_alarm(ids, setting))
        labels.append(label)
    outcome = trigger_outcomes(alarms, labels)
    outcome["false_alarms"] = sum(a is not None for a, t in zip(alarms, labels) if _healthy(t))
    outcome["loops_caught_count"] = sum(a is not None for a, t in zip(alarms, labels) if t.loop_onset is not None)
    outcome["setting"] = setting.__dict__
    outcome["alarms"] = alarms
    return outcome


def rule_false_alarm_line(outcome: dict[str, Any]) -> str:
    """One line stating the rule's false-alarm rate, for reports (`rescue compare`, `detect-report`)."""
    setting = RuleSetting(**outcome["setting"])
    if not outcome["healthy"]:
        return f"rule loop check ({setting.describe()}): no healthy traces to measure false alarms on"
    caught = (f"; catches {outcome['loops_caught_count']} of {outcome['loops']} labeled loops"
              if outcome["loops"] else "")
    return (f"rule loop check ({setting.describe()}): fires on {outcome['false_alarms']} of {outcome['healthy']} "
            f"healthy traces ({outcome['false_alarm_rate']:.0%} false alarms){caught}")


def rule_on_records(records: Sequence[dict], tokenizer, control, labels_params) -> dict[str, Any]:
    """`rule_outcomes` of the configured rule on the traces of an evaluation record (the rows of
    `records.jsonl`: text, finish_reason, gold), labeled as `rescue label` labels them: what
    `rescue compare` states as the rule's false-alarm rate on its naive 2-bit traces."""
    from training.labels import label_records

    labels = label_records(records, tokenizer, labels_params)
    ids = []
    for row in records:
        tokens = tokenizer.encode(row["text"], add_special_tokens=False)
        if row["finish_reason"] == "eos" and tokenizer.eos_token_id is not None:
            tokens.append(tokenizer.eos_token_id)
        ids.append(tokens)
    return rule_outcomes(zip(ids, labels), rule_setting(control))


def calibrate_rule(traces: Sequence[tuple[Sequence[int], Any]], target: float, ngrams: Sequence[int] = NGRAMS,
                   windows: Sequence[int] = WINDOWS, counts: Sequence[int] = COUNTS) -> dict[str, Any]:
    """The loop-check setting that fires on at most `target` of the healthy traces and, among those,
    catches the most labeled loops, then fires closest to their onsets (smallest median of |alarm
    minus onset|: an alarm long before the labeled onset is no better than a late one), then is the
    most sensitive (shortest n-gram, fewest repeats, widest window).
    Returns the chosen setting with its outcomes, and every setting tried (`grid`)."""
    healthy = [t for t in traces if _healthy(t[1])]
    if not healthy:
        raise ValueError("calibrating the rule needs healthy traces (no loop, committed)")
    allowed = math.floor(target * len(healthy) + 1e-9)
    grid = []
    for ngram in ngrams:
        gaps = [ngram_gaps(ids, ngram, max(counts) - 1) for ids, _ in traces]
        for window in windows:
            if window < ngram:
                continue
            for count in counts:
                setting = RuleSetting(ngram, window, count)
                alarms = [first_rule_alarm(ids, setting, gap) for (ids, _), gap in zip(traces, gaps)]
                false = sum(a is not None for a, (_, t) in zip(alarms, traces) if _healthy(t))
                leads = [a - t.loop_onset for a, (_, t) in zip(alarms, traces) if t.loop_onset is not None and a is not None]
                grid.append({"setting": setting, "false_alarms": false, "loops_caught": len(leads),
                             "median_lead_tokens": float(np.median(leads)) if leads else None,
                             "median_distance_tokens": float(np.median(np.abs(leads))) if leads else None})
    fits = [row for row in grid if row["false_alarms"] <= allowed]
    if not fits:
        raise ValueError(f"no rule setting of the grid fires on at most {target:.0%} of {len(healthy)} healthy traces")

    def preference(row):
        setting = row["setting"]
        distance = row["median_distance_tokens"]
        return (-row["loops_caught"], math.inf if distance is None else distance, setting.ngram, setting.count,
                -setting.window)

    best = min(fits, key=preference)
    return {"setting": best["setting"], "target_false_alarm_rate": target, "healthy": len(healthy),
            "false_alarms": best["false_alarms"], "loops": sum(t.loop_onset is not None for _, t in traces),
            "loops_caught": best["loops_caught"], "median_lead_tokens": best["median_lead_tokens"], "grid": grid}


# The loop check as the paper-like default has it (`ControlConfig`'s defaults).
PAPER_RULE = RuleSetting(16, 256, 3)


def replay_report(traces: Sequence[tuple[Sequence[int], Any]], configured: RuleSetting, target: float,
                  source: str, out_dir, excerpts: Sequence[str] = (), notes: Sequence[str] = ()) -> dict[str, Any]:
    """The text-only detect report: the configured rule, the paper-like rule and the rule calibrated
    on these traces' healthy ones for `target` false alarms, replayed on labeled traces. Writes
    `report.md` and `comparison.json` to `out_dir`; returns the same as a dict."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {f"configured rule ({configured.describe()})": rule_outcomes(traces, configured)}
    if configured != PAPER_RULE:
        rows[f"paper-like rule ({PAPER_RULE.describe()})"] = rule_outcomes(traces, PAPER_RULE)
    calibration = None
    try:
        calibration = calibrate_rule(traces, target)
    except ValueError as error:
        calibration = {"skipped": str(error)}
    if "setting" in calibration:
        chosen = calibration["setting"]
        rows[f"calibrated here for <= {target:.0%} ({chosen.describe()})"] = rule_outcomes(traces, chosen)
    table = ["| rule | loops caught | healthy traces flagged | median alarm - onset (tokens) |",
             "| --- | ---: | ---: | ---: |"]
    for name, row in rows.items():
        lead = "-" if row["median_lead_tokens"] is None else f"{row['median_lead_tokens']:+.0f}"
        table.append(f"| {name} | {row['loops_caught_count']} of {row['loops']} | {row['false_alarms']} of "
                     f"{row['healthy']} | {lead} |")
    lines = [f"# Rules replayed on {source}", "", *notes, *([""] if notes else []),
             "Text only: the rule's loop check replayed token by token on labeled traces (healthy: no labeled "
             "loop, committed); no hidden states, so no learned trigger.", "", *table, ""]
    if "setting" in calibration:
        chosen = calibration["setting"]
        lines += ["In-sample: the calibrated row is chosen on these same traces (fewest missed loops, then the "
                  "alarm closest to the labeled onset, among settings flagging at most "
                  f"{target:.0%} of the {calibration['healthy']} healthy traces). To use it:", "",
                  "```yaml", "rescue:", f"  rule_ngram: {chosen.ngram}", f"  rule_window: {chosen.window}",
                  f"  rule_count: {chosen.count}", "```", ""]
    else:
        lines += [f"No calibrated rule: {calibration['skipped']}.", ""]
    if excerpts:
        lines += ["## What the loops look like", "", *excerpts]
    (out / "report.md").write_text("\n".join(lines))
    summary = {"source": source, "traces": len(traces), "target_false_alarm_rate": target,
               "rules": {name: {k: v for k, v in row.items() if k != "alarms"} for name, row in rows.items()},
               "calibrated": None if "setting" not in calibration else {
                   **{k: v for k, v in calibration.items() if k not in ("grid", "setting")},
                   "setting": calibration["setting"].__dict__},
               "out": str(out)}
    (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
