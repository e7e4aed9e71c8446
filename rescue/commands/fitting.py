"""`rescue train`: the learned detector on labeled trace sets."""

from __future__ import annotations

from inference.config import RescueConfig


def train(config: RescueConfig, traces: str, val: str | None = None, out: str | None = None,
          test: str | None = None) -> dict:
    """Fit the probe on labeled trace sets, calibrate it and write the detector artifact.

    With `test`, the offline comparison with the rule (`detect-report`) follows on those traces.
    """
    from training.fit import detect_report as compare_offline
    from training.fit import train_detector

    summary = train_detector(config, traces, val=val, out=out)
    if test is not None:
        summary["detect_report"] = compare_offline(config, test, detector=summary["artifact"])
    return summary
