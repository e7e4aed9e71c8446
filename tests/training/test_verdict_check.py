"""benchmarks/verdict_check.py: verdicts drawn in the style a model was trained on."""

import json

import pytest
from conftest import benchmark_script

from inference.errors import RescueError
from training.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def verdict_check():
    return benchmark_script("verdict_check")


def test_style_from_a_pretrain_record_writes_the_verdicts_in_that_style(verdict_check, tmp_path):
    style = {"verify_rate": 0.9, "final_slip_rate": 0.6, "max_verification_passes": 12, "max_trace_chars": 1000,
             "verify_steps": 1, "max_rechecks": 3}  # as pretrain.json records it: max_rechecks is not a config field
    (tmp_path / "pretrain.json").write_text(json.dumps({"model": "tiny-m", "trace_style": style}))
    tokenizer = build_tokenizer()

    overrides = verdict_check.trained_style(str(tmp_path))
    own = verdict_check.verdict_prefixes("tiny-s", 120, 7, 400, tokenizer, overrides)
    config = verdict_check.verdict_prefixes("tiny-s", 120, 7, 400, tokenizer)  # whole-chain passes

    assert overrides["pretrain.verify_steps"] == 1 and overrides["pretrain.final_slip_rate"] == 0.6
    assert "pretrain.max_rechecks" not in overrides
    # One-step passes restate one step: no ", " inside a pass line; the config's passes restate the chain.
    own_passes = [line for prefix, _ in own for line in prefix.splitlines() if line.startswith("Let me verify")]
    config_passes = [line for prefix, _ in config for line in prefix.splitlines() if line.startswith("Let me verify")]
    assert own_passes and all(", " not in line for line in own_passes)
    assert config_passes and all(", " in line for line in config_passes)
    share = sum(kind == "disagree" for _, kind in own) / len(own)
    assert share > sum(kind == "disagree" for _, kind in config) / len(config)


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    ("{not json", "expected a JSON object with a 'trace_style' object"),
    ('{"model": "tiny-m"}', "expected a JSON object with a 'trace_style' object"),
])
def test_style_from_refuses_a_folder_without_a_readable_record(verdict_check, tmp_path, content, problem):
    if content is not None:
        (tmp_path / "pretrain.json").write_text(content)
    with pytest.raises(RescueError, match=problem):
        verdict_check.trained_style(str(tmp_path))


def test_main_says_what_is_wrong_in_one_line(verdict_check, tmp_path, capsys):
    assert verdict_check.main(["--config", "tiny-m", "--style-from", str(tmp_path), str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "pretrain.json: no such file" in error
