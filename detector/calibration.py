"""Alarm thresholds: a head raises an alarm once its score stays at or above a threshold for k
consecutive probe steps (the patience); the threshold is set on validation traces so that at most a
target share of *healthy* traces (no loop, committed) ever raise one.

A probe step is one scored position. Calibration scores only positions on the trace set's capture
stride (generated position % stride == 0), the positions every trace has at the same spacing; a
trigger that scores every stride-th token during decoding sees what calibration saw. (Trace sets also
keep dense windows around label events; counting those would make traces that have events look
different from those that do not.)

For a head, a trace alarms at threshold t iff its *sustained peak* (the largest over windows of k
consecutive steps of the window's smallest score) is >= t, so the false-alarm rate as a function of t
is a step function of the healthy traces' sustained peaks and the lowest admissible t is exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

NEVER = 2.0
"""A threshold above any probability: the head never alarms (an untrained head, a disabled action)."""


@dataclass
class HeadCalibration:
    """One head's threshold and what it achieves on the validation traces."""

    head: str
    threshold: float
    """Alarm when the score (a probability) is >= this for `patience` consecutive steps."""
    patience: int
    target_false_alarm_rate: float
    false_alarm_rate: float
    """Share of healthy validation traces with at least one alarm."""
    healthy_traces: int
    positive_traces: int
    """Validation traces this head should alarm on (loops, or failures to commit)."""
    detection_rate: float | None
    """Share of those with at least one alarm (None without any)."""

    def to_dict(self) -> dict:
        return asdict(self)


def sustained_peak(scores: np.ndarray, patience: int) -> float:
    """max over i of min(scores[i : i + patience]); -inf for fewer than `patience` scores."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) < patience:
        return float("-inf")
    if patience == 1:
        return float(scores.max())
    windows = np.lib.stride_tricks.sliding_window_view(scores, patience)
    return float(windows.min(axis=1).max())


def first_alarm(scores: np.ndarray, threshold: float, patience: int) -> int | None:
    """Index of the step at which the alarm goes off (the k-th consecutive step >= threshold), or None."""
    run = 0
    for index, above in enumerate(np.asarray(scores) >= threshold):
        run = run + 1 if above else 0
        if run >= patience:
            return index
    return None


def choose_threshold(healthy_peaks: Sequence[float], target: float) -> float:
    """The lowest threshold at which at most `target` of the healthy traces' sustained peaks reach it."""
    peaks = np.sort(np.asarray(healthy_peaks, dtype=np.float64))[::-1]
    allowed = int(np.floor(target * len(peaks) + 1e-9))
    if allowed >= len(peaks):
        return 0.0
    # Above the (allowed + 1)-th largest peak: that trace and all below it stay silent.
    return float(np.nextafter(peaks[allowed], np.inf))


def calibrate_head(head: str, scores: Sequence[np.ndarray], healthy: Sequence[bool], positive: Sequence[bool],
                   patience: int, target: float) -> HeadCalibration:
    """Threshold of one head from per-trace score sequences (probabilities on the stride grid)."""
    peaks = np.array([sustained_peak(s, patience) for s in scores])
    healthy, positive = np.asarray(healthy, dtype=bool), np.asarray(positive, dtype=bool)
    if not healthy.any():
        raise ValueError("no healthy validation traces (no loop, committed) to set a false-alarm rate on")
    threshold = choose_threshold(peaks[healthy], target)
    alarmed = peaks >= threshold
    return HeadCalibration(
        head=head, threshold=threshold, patience=patience, target_false_alarm_rate=target,
        false_alarm_rate=float(alarmed[healthy].mean()), healthy_traces=int(healthy.sum()),
        positive_traces=int(positive.sum()),
        detection_rate=float(alarmed[positive].mean()) if positive.any() else None,
    )


def choose_plan_threshold(risks: Sequence[float], failing: Sequence[bool], target: float) -> dict:
    """The planning threshold of the learned trigger: plan when a trace's early risk (its highest
    `fails_to_commit` score over the first probed positions) is >= the threshold.

    Planning costs FP16 tokens on every trace it fires on, so it is held to the same budget as an
    alarm: the lowest threshold at which at most `target` of the healthy validation traces would plan
    (`choose_threshold` on their risks). The card records how many failing and healthy validation
    traces that plans.
    """
    risks, failing = np.asarray(risks, dtype=np.float64), np.asarray(failing, dtype=bool)
    healthy = ~failing
    threshold = choose_threshold(risks[healthy], target) if healthy.any() else float(np.nextafter(1.0, np.inf))
    planned = risks >= threshold
    return {"threshold": float(threshold), "target_planned_healthy": target,
            "planned_failing": float(planned[failing].mean()) if failing.any() else None,
            "planned_healthy": float(planned[healthy].mean()) if healthy.any() else None,
            "failing_traces": int(failing.sum()), "healthy_traces": int(healthy.sum())}
