"""The rule replayed on labeled traces: the same alarms as the step-by-step reading, its
false-alarm rate on healthy traces, and calibration for a target rate."""

import numpy as np
import pytest

from inference.config import load_config
from training.fit import ngram_repeats
from training.labels import TraceLabels
from training.replay import (
    PAPER_RULE,
    RuleSetting,
    calibrate_rule,
    first_rule_alarm,
    rule_false_alarm_line,
    rule_on_records,
    rule_outcomes,
    rule_setting,
)


def labels(length: int, loop_onset: int | None = None, committed: bool = True) -> TraceLabels:
    return TraceLabels(length=length, loop_onset=loop_onset, loop_period=None if loop_onset is None else 20,
                       budget_exhausted=not committed, unclosed_think=not committed, committed=committed,
                       first_candidate_pos=None, delayed_commitment=False, correct=committed,
                       fails_to_commit=not committed)


def varied(count: int, seed: int) -> list[int]:
    return (np.random.default_rng(seed).permutation(50_000)[:count] + 1000).tolist()


def with_phrase(repeats: int, gap: int, seed: int) -> list[int]:
    """Varied tokens holding one 20-token phrase `repeats` times, `gap` varied tokens apart."""
    phrase = list(range(1, 21))
    ids = varied(100, seed)
    for k in range(repeats):
        ids += phrase + varied(gap, seed + 100 + k)
    return ids


@pytest.mark.parametrize("setting", [RuleSetting(16, 256, 3), RuleSetting(4, 64, 5), RuleSetting(2, 10, 2)])
def test_vectorized_rule_fires_where_the_step_by_step_count_does(setting):
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, 6, size=400).tolist() if setting.ngram <= 4 else with_phrase(4, int(rng.integers(10, 120)), 3)
        counts = ngram_repeats(ids, setting.ngram, setting.window)
        fired = np.flatnonzero(counts >= setting.count)
        assert first_rule_alarm(ids, setting) == (int(fired[0]) if len(fired) else None)


def test_false_alarm_rate_counts_only_healthy_traces():
    traces = [(with_phrase(3, 30, 1), labels(200)),  # healthy, the paper-like rule fires: false alarm
              (varied(300, 2), labels(300)),  # healthy, silent
              (with_phrase(8, 5, 3), labels(300, loop_onset=100, committed=False))]  # a loop, caught
    outcome = rule_outcomes(traces, PAPER_RULE)
    assert (outcome["false_alarms"], outcome["healthy"], outcome["false_alarm_rate"]) == (1, 2, 0.5)
    assert outcome["loops_caught_count"] == 1 and outcome["loops"] == 1
    assert rule_false_alarm_line(outcome) == ("rule loop check (16-gram 3x within 256 tokens): fires on 1 of 2 "
                                              "healthy traces (50% false alarms); catches 1 of 1 labeled loops")


def test_calibration_meets_the_target_and_keeps_the_loops():
    healthy = [(with_phrase(3, 30, seed), labels(250)) for seed in range(4)]  # a phrase 3x: paper-like fires
    loops = [(with_phrase(10, 2, 10 + seed), labels(320, loop_onset=100, committed=False)) for seed in range(2)]
    assert rule_outcomes(healthy + loops, PAPER_RULE)["false_alarms"] == 4
    chosen = calibrate_rule(healthy + loops, target=0.0)
    assert chosen["false_alarms"] == 0 and chosen["loops_caught"] == 2
    assert rule_outcomes(healthy + loops, chosen["setting"])["false_alarms"] == 0
    with pytest.raises(ValueError, match="healthy traces"):
        calibrate_rule(loops, target=0.1)


def test_rule_on_records_labels_and_replays_an_evaluation_record():
    from training.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    phrase = "Let me check 17 + 8 = 25 again. "
    rows = [{"text": "<think>\n" + phrase * 3 + "\n</think>\n\nThe answer is \\boxed{25}.", "finish_reason": "eos",
             "gold": "25"},
            {"text": "<think>\nSo 17 + 8 = 25.\n</think>\n\nThe answer is \\boxed{25}.", "finish_reason": "eos",
             "gold": "25"}]
    config = load_config("tiny-s")
    outcome = rule_on_records(rows, tokenizer, config.rescue, config.labels)
    # The first row repeats one 32-character phrase 3 times: a loop by the labels' definition
    # (3 verbatim blocks over >= 48 tokens), so only the second one is healthy.
    assert outcome["loops"] == 1 and outcome["healthy"] == 1 and outcome["false_alarms"] == 0
    assert outcome["setting"] == rule_setting(config.rescue).__dict__


def test_text_only_detect_report_on_a_trace_set_needs_no_detector(tmp_path):
    import json

    from rescue import commands
    from test_datamodule import synthetic_config, write_planted_trace_set  # same folder, on sys.path under pytest

    traces = write_planted_trace_set(tmp_path / "traces", problems=10)
    recorded = json.loads((traces / "labels.json").read_text())["traces"].values()
    healthy = sum(row["loop_onset"] is None and not row["fails_to_commit"] for row in recorded)
    config = synthetic_config(tmp_path)
    summary = commands.detect_report(config, test=str(traces), text_only=True)
    configured = summary["rules"]["configured rule (16-gram 3x within 256 tokens)"]
    # Planted ids are random tokens: no 16-gram ever recurs, so the rule never fires.
    assert configured["healthy"] == healthy > 0 and configured["false_alarms"] == 0
    assert configured["loops_caught_count"] == 0 and configured["loops"] > 0
    assert (tmp_path / "runs" / "synthetic" / "detect-report-text" / "report.md").is_file()
