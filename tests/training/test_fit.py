"""train_detector: fit on a planted-signal trace set, calibrate, write a loadable artifact."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from detector.artifact import CARD, load_detector
from detector.probe import ALARM_HEADS, HEADS
from inference.errors import RescueError
from test_datamodule import (  # same folder, on sys.path under pytest
    downgrade_to_schema_1,
    synthetic_config,
    write_planted_trace_set,
)
from training.datamodule import manifest_sha256
from training.fit import confidence_alarm, detect_report, ngram_repeats, train_detector, tune_confidence_rule

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
    for head in ALARM_HEADS:
        assert summary["calibration"]["heads"][head]["false_alarm_rate"] <= 0.05
    # The action policy, per FP16 budget: more budget never models a lower accuracy, and spends within it.
    budgets = summary["calibration"]["policy"]["budgets"]
    accuracies = [b["modeled_accuracy"] for b in budgets]
    assert accuracies == sorted(accuracies) and accuracies[-1] > accuracies[0]
    # (Loop alarms alone may spend FP16 tokens: a smaller budget gets the cheapest choice.)
    floor = budgets[0]["modeled_fp16_share"]
    assert all(b["modeled_fp16_share"] <= max(b["fp16_budget"], floor) + 1e-9 for b in budgets)
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
    assert detector.thresholds.keys() == set(HEADS) and detector.has_decision_heads
    assert (tmp_path / "runs" / "synthetic" / "train" / "pr-curves.png").is_file()
    assert card["calibration"]["rules"]["ngram"]["false_alarm_rate"] <= 0.05
    confidence = card["calibration"]["rules"]["confidence"]
    assert confidence["window"] == 32 and confidence["false_alarm_rate"] <= 0.05
    assert 0.3 < confidence["threshold"] < 0.31 and confidence["detection_rate"] > 0.5

    held_out = write_planted_trace_set(tmp_path / "test", problems=20, seed=2)
    report = detect_report(config, str(held_out))
    learned = report["triggers"]["learned loop_within_h"]
    assert learned["loops_caught"] > 0.8 and learned["false_alarm_rate"] <= 0.15
    assert set(report["triggers"]) >= {"learned (either head)", "n-gram rule", "confidence rule"}
    assert report["skipped_rules"] == {}
    rule = report["triggers"]["confidence rule"]
    # Planted: the last uncertain token comes 1-8 tokens before onset + 4; W = 32 tokens later, the alarm.
    assert rule["loops_caught"] > 0.5 and rule["false_alarm_rate"] == 0.0
    assert set(rule["lead_tokens"]) <= set(range(32 - 4, 32 + 4)) and rule["median_lead_tokens"] is not None
    out = tmp_path / "runs" / "synthetic" / "detect-report"
    for name in ("report.md", "comparison.json", "lead-times.png", "pr-curves.png"):
        assert (out / name).is_file()
    assert "| confidence rule |" in (out / "report.md").read_text()

    old = downgrade_to_schema_1(held_out)
    report = detect_report(config, str(old), out=str(tmp_path / "old-report"))
    assert "confidence rule" not in report["triggers"] and "n-gram rule" in report["triggers"]
    assert "schema version 1 stores no top-token probabilities" in report["skipped_rules"]["confidence rule"]
    assert "confidence rule: not replayed" in (tmp_path / "old-report" / "report.md").read_text()


def test_training_logs_to_offline_wandb(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = synthetic_config(tmp_path, **{**FAST, "detector.max_epochs": 1, "wandb.mode": "offline"})
    train_detector(config, str(planted), out=str(tmp_path / "detector"), progress=False)
    runs = list((tmp_path / "runs" / "synthetic" / "train" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert (tmp_path / "detector" / CARD).is_file()


def test_no_positive_labels_is_one_clear_error(tmp_path):
    traces = write_planted_trace_set(tmp_path / "traces", problems=8, loops=False, fails=False, wrong=False,
                                     steps=False)
    with pytest.raises(RescueError, match="no positive labels for loop_within_h"):
        train_detector(synthetic_config(tmp_path), str(traces), progress=False)


def test_a_head_without_positives_trains_the_other_and_never_alarms(tmp_path, capsys):
    traces = write_planted_trace_set(tmp_path / "traces", problems=40, loops=False)
    config = synthetic_config(tmp_path, **{**FAST, "detector.max_epochs": 2})
    summary = train_detector(config, str(traces), out=str(tmp_path / "detector"), progress=True)
    assert "loop_within_h: untrained, alarm disabled" in capsys.readouterr().out
    card = json.loads((tmp_path / "detector" / CARD).read_text())
    loop = card["calibration"]["heads"]["loop_within_h"]
    assert loop["threshold"] > 1.0 and "no positive labels" in loop["untrained"]
    assert card["calibration"]["heads"]["fails_to_commit"]["threshold"] <= 1.0
    assert "fails_to_commit/auroc" in summary["val"] and "loop_within_h/auroc" not in summary["val"]


def test_an_untrained_fails_to_commit_head_never_plans(tmp_path):
    """tiny-m and tiny-l traces never fail to commit: the planning threshold must not fall to the
    smallest float above 0 (which planned every trace on the GPU), but stay above any probability."""
    from inference.control.triggers import LearnedTrigger
    from detector.artifact import load_detector

    traces = write_planted_trace_set(tmp_path / "traces", problems=40, fails=False)
    config = synthetic_config(tmp_path, **{**FAST, "detector.max_epochs": 2})
    train_detector(config, str(traces), out=str(tmp_path / "detector"), progress=False)
    card = json.loads((tmp_path / "detector" / CARD).read_text())
    plan = card["calibration"]["plan"]
    assert plan["threshold"] > 1.0 and "no positive labels for fails_to_commit" in plan["untrained"]
    assert LearnedTrigger(load_detector(str(tmp_path / "detector"))).plan_threshold > 1.0


def test_ngram_repeats_counts_the_newest_ngram_within_the_window():
    ids = [1, 2, 1, 2, 1, 2, 9, 1, 2]
    assert ngram_repeats(ids, 2, window=100).tolist() == [0, 1, 1, 2, 2, 3, 1, 1, 4]
    assert ngram_repeats(ids, 2, window=4).tolist() == [0, 1, 1, 2, 2, 2, 1, 1, 1]


def _scored(top_prob, loop_onset=None):
    return {"top_prob": np.asarray(top_prob, dtype=np.float64), "healthy": loop_onset is None,
            "labels": SimpleNamespace(loop_onset=loop_onset)}


def test_confidence_rule_tuned_to_the_false_alarm_target_and_alarms_after_w_high_tokens():
    window = 8
    scored = []
    for i in range(20):  # healthy trace i: one 8-token run at 0.5 + 0.02 i, its sustained peak
        top_prob = np.full(100, 0.5)
        top_prob[30 : 30 + window] = 0.5 + 0.02 * i
        scored.append(_scored(top_prob))
    looping = np.full(100, 0.5)
    looping[60:] = 0.95
    scored.append(_scored(looping, loop_onset=55))
    rule = tune_confidence_rule(scored, window, target=0.1)
    # Two of 20 healthy traces may alarm: the threshold sits just above the third-highest peak (0.84).
    assert 0.84 < rule["threshold"] <= 0.86 and rule["false_alarm_rate"] == 0.1 and rule["detection_rate"] == 1.0
    assert confidence_alarm(looping, rule["threshold"], window) == 60 + window - 1
    assert confidence_alarm(scored[17]["top_prob"], rule["threshold"], window) is None
    assert confidence_alarm(scored[18]["top_prob"], rule["threshold"], window) == 30 + window - 1
    strict = tune_confidence_rule(scored, window, target=0.0)
    assert strict["false_alarm_rate"] == 0.0 and strict["threshold"] > 0.88
    short = tune_confidence_rule([_scored([0.99] * 4), _scored([0.99] * 4), _scored(looping, 55)], window, 0.0)
    assert short["threshold"] == 0.0 and short["false_alarm_rate"] == 0.0  # no healthy trace reaches W tokens


def test_confidence_rule_skipped_with_a_reason_without_top_prob():
    scored = [{**_scored([0.5] * 10), "top_prob": None}]
    rule = tune_confidence_rule(scored, 8, 0.05)
    assert "threshold" not in rule and "store no top-token probabilities" in rule["skipped"]


def test_the_rule_is_tuned_per_fp16_budget_with_the_learned_policys_model():
    from training.fit import tune_rule_for_budgets
    from training.labels import TraceLabels

    def trace(ids, correct, candidates=(), unclosed=False, steps=()):
        label = TraceLabels(length=len(ids), loop_onset=None, loop_period=None, budget_exhausted=False,
                            unclosed_think=unclosed, committed=not unclosed, first_candidate_pos=None,
                            delayed_commitment=False, correct=correct, fails_to_commit=unclosed,
                            candidates=tuple(candidates), steps=tuple(steps))
        return {"labels": label, "generated_ids": ids}

    healthy = list(range(100))                                   # never repeats
    looping = list(range(20)) + [7, 8, 9, 10] * 20               # the 4-gram repeats from position 23 on
    scored = ([trace(healthy, True) for _ in range(6)]
              + [trace(looping, False, candidates=[(10, True)]) for _ in range(2)]   # a right answer stated first
              + [trace(looping, False) for _ in range(2)])                            # nothing to commit to
    tuned = tune_rule_for_budgets(scored, ngram=4, budget_limit=None, plan_tokens=50, fallback_success=1.0,
                                  budgets=(0.0, 0.5))
    free, paid = tuned["budgets"]
    # No FP16: the loop check commits the two loops that stated the right answer, and never plans.
    assert free["on_alarm"] == "commit" and not free["plan"] and free["modeled_fp16_share"] == 0.0
    assert free["modeled_accuracy"] == pytest.approx(0.8)
    # With FP16 to spend, the loops without a candidate fall back too; planning (modeled useless) never pays.
    assert paid["modeled_accuracy"] == pytest.approx(1.0) and 0 < paid["modeled_fp16_share"] <= 0.5
    assert not paid["plan"] and paid["count"] >= 2 and paid["window"] in (128, 256, 512)
    assert tuned["reference_length"] == pytest.approx(100.0)
    # The budget check fires where a trace ran past its limit still thinking.
    stuck = [trace(healthy, True) for _ in range(3)] + [trace(list(range(300)), False, unclosed=True)]
    checked = tune_rule_for_budgets(stuck, ngram=4, budget_limit=200, plan_tokens=0, fallback_success=1.0,
                                    budgets=(1.0,))["budgets"][0]
    assert checked["modeled_accuracy"] == pytest.approx(1.0) and checked["alarmed"] == pytest.approx(0.25)
    # A fallback after a wrong step written before the alarm carries it on: the trace ends as it did.
    inherited = ([trace(healthy, True) for _ in range(6)]
                 + [trace(looping, False, steps=[(12, True, 10)]) for _ in range(4)])
    paid = tune_rule_for_budgets(inherited, ngram=4, budget_limit=None, plan_tokens=0, fallback_success=1.0,
                                 budgets=(1.0,))["budgets"][0]
    assert paid["modeled_accuracy"] == pytest.approx(0.6)
