"""Calibration: thresholds with a patience meet the target false-alarm rate on healthy traces."""

from __future__ import annotations

import numpy as np
import pytest

from detector.calibration import calibrate_head, choose_threshold, first_alarm, sustained_peak


def test_sustained_peak_needs_patience_consecutive_steps():
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2])
    assert sustained_peak(scores, 1) == 0.9
    assert sustained_peak(scores, 2) == 0.7
    assert sustained_peak(scores, 6) == float("-inf")


def test_first_alarm_is_the_kth_consecutive_step():
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.9])
    assert first_alarm(scores, 0.5, 2) == 3
    assert first_alarm(scores, 0.5, 1) == 0
    assert first_alarm(scores, 0.95, 1) is None


def test_threshold_allows_exactly_the_target_share():
    peaks = np.linspace(0, 1, 100)
    threshold = choose_threshold(peaks, 0.05)
    assert (peaks >= threshold).sum() == 5
    assert choose_threshold(peaks[:10], 0.05) > peaks[:10].max()  # 5% of 10 traces: none may alarm


@pytest.mark.parametrize("patience", [1, 3])
def test_calibration_meets_target_on_validation_and_catches_separated_loops(patience):
    rng = np.random.default_rng(0)
    healthy = [rng.uniform(0, 0.6, rng.integers(10, 40)) for _ in range(200)]
    looping = [np.concatenate([rng.uniform(0, 0.4, 10), rng.uniform(0.8, 1.0, 10)]) for _ in range(50)]
    result = calibrate_head("loop_within_h", healthy + looping, [True] * 200 + [False] * 50,
                            [False] * 200 + [True] * 50, patience, 0.05)
    assert result.false_alarm_rate <= 0.05
    assert result.false_alarm_rate > 0.03  # as permissive as the target allows
    assert result.detection_rate == 1.0
    assert result.healthy_traces == 200 and result.positive_traces == 50
    peaks = np.array([sustained_peak(s, patience) for s in healthy])
    assert np.mean(peaks >= result.threshold) == result.false_alarm_rate


def test_calibration_without_healthy_traces_is_an_error():
    with pytest.raises(ValueError, match="no healthy validation traces"):
        calibrate_head("fails_to_commit", [np.ones(3)], [False], [True], 1, 0.05)


def test_plan_threshold_plans_at_most_the_target_share_of_healthy_traces():
    from detector.calibration import choose_plan_threshold

    healthy = [0.01 * i for i in range(20)]          # 0.00 .. 0.19
    failing = [0.5, 0.15, 0.9]
    result = choose_plan_threshold(healthy + failing, [False] * 20 + [True] * 3, target=0.1)
    # 10% of 20 healthy traces = 2 may plan: the threshold sits just above the third-highest healthy risk.
    assert 0.17 < result["threshold"] <= 0.18 + 1e-9
    assert result["planned_healthy"] == 0.1
    assert result["planned_failing"] == 2 / 3          # 0.5 and 0.9 plan, 0.15 does not
    assert choose_plan_threshold(healthy, [False] * 20, target=0.0)["threshold"] > 0.19
