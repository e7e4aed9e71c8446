"""train_detector: fit on a planted-signal trace set, calibrate, write a loadable artifact."""

from __future__ import annotations

import json

import pytest

from detector.artifact import CARD, load_detector
from detector.probe import HEADS
from inference.errors import RescueError
from test_datamodule import synthetic_config, write_planted_trace_set  # same folder, on sys.path under pytest
from training.datamodule import manifest_sha256
from training.fit import detect_report, ngram_repeats, train_detector

FAST = {"detector.max_epochs": 6, "detector.hidden_width": 16, "detector.learning_rate": 3e-3,
        "detector.early_stopping_patience": 3}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_trace_set(tmp_path_factory.mktemp("planted"), problems=60)


def test_training_learns_planted_signal_and_writes_calibrated_artifact(planted, tmp_path):
    config = synthetic_config(tmp_path, **FAST)
    summary = train_detector(config, str(planted), progress=False)
    for head in HEADS:
        assert summary["val"][f"{head}/auroc"] > 0.9, summary["val"]
        assert summary["calibration"]["heads"][head]["false_alarm_rate"] <= 0.05
    assert summary["calibration"]["heads"]["loop_within_h"]["detection_rate"] > 0.8
    folder = tmp_path / "runs" / "synthetic" / "detector"
    assert summary["artifact"] == str(folder)
    detector = load_detector(folder, model_name="synthetic", hidden_size=16, layers=[0, 1])
    card = json.loads((folder / CARD).read_text())
    assert card["training_data"] == [{"path": str(planted), "role": "train", "manifest_sha256": manifest_sha256(planted),
                                      "traces": 120}]
    assert card["calibration"]["target_false_alarm_rate"] == 0.05
    assert card["calibration"]["stride"] == 4
    assert card["metrics"]["val"] == summary["val"]
    assert card["probe"]["probe_flops_per_step"] > 0
    assert detector.thresholds.keys() == set(HEADS)
    assert (tmp_path / "runs" / "synthetic" / "train" / "pr-curves.png").is_file()
    assert card["calibration"]["rules"]["ngram"]["false_alarm_rate"] <= 0.05

    held_out = write_planted_trace_set(tmp_path / "test", problems=20, seed=2)
    report = detect_report(config, str(held_out))
    learned = report["triggers"]["learned loop_within_h"]
    assert learned["loops_caught"] > 0.8 and learned["false_alarm_rate"] <= 0.15
    assert set(report["triggers"]) >= {"learned (either head)", "n-gram rule"}
    for name in ("report.md", "comparison.json", "lead-times.png", "pr-curves.png"):
        assert (tmp_path / "runs" / "synthetic" / "detect-report" / name).is_file()


def test_training_logs_to_offline_wandb(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = synthetic_config(tmp_path, **{**FAST, "detector.max_epochs": 1, "wandb.mode": "offline"})
    train_detector(config, str(planted), out=str(tmp_path / "detector"), progress=False)
    runs = list((tmp_path / "runs" / "synthetic" / "train" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert (tmp_path / "detector" / CARD).is_file()


def test_no_positive_labels_is_one_clear_error(tmp_path):
    traces = write_planted_trace_set(tmp_path / "traces", problems=8, loops=False)
    with pytest.raises(RescueError, match="no positive labels for loop_within_h"):
        train_detector(synthetic_config(tmp_path), str(traces), progress=False)


def test_ngram_repeats_counts_the_newest_ngram_within_the_window():
    ids = [1, 2, 1, 2, 1, 2, 9, 1, 2]
    assert ngram_repeats(ids, 2, window=100).tolist() == [0, 1, 1, 2, 2, 3, 1, 1, 4]
    assert ngram_repeats(ids, 2, window=4).tolist() == [0, 1, 1, 2, 2, 2, 1, 1, 1]
