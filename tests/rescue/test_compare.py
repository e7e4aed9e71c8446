"""`rescue compare` / `rescue evaluate --method rule|learned|...` on a tiny random Qwen3 (CPU, no downloads)."""

import json

import pytest
import torch
import yaml

from detector.artifact import save_detector
from detector.features import FeatureRecipe, NormalisationStats
from detector.probe import HEADS, Probe
from inference.config import load_config
from rescue.cli import main
from rescue.commands import _quantized_matches


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, arith_jsonl):
    folder = tmp_path_factory.mktemp("compare")
    config = {
        "model": {"name": "tiny", "fp16": str(tiny_model_dir), "device": "cpu"},
        "sampling": {"budget": 12, "batch_size": 4},
        "quantization": {"bits": 2, "group_size": 32,
                         "calibration": {"benchmark": "arith", "split": "train", "size": 8}},
        "probe": {"layers": [-1]},
        "rescue": {"plan_tokens": 4, "rule_ngram": 2, "rule_window": 8, "rule_count": 2},
        "benchmark": {"name": "gsm8k", "split": "test", "path": str(arith_jsonl)},
        "wandb": {"mode": "disabled"},
        "output_dir": str(folder / "runs"),
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["quantize", "--config", str(path)]) == 0
    return path


def _detector(folder, name="tiny", hidden_size=64, layers=(-1,)):
    recipe = FeatureRecipe(layers=tuple(layers), hidden_size=hidden_size, mean_window=0, stride=2)
    torch.manual_seed(0)
    probe = Probe(recipe.feature_dim, hidden_width=8, heads=HEADS[:2])
    stats = NormalisationStats(mean=torch.zeros(len(layers), hidden_size), std=torch.ones(len(layers), hidden_size))
    heads = {head: {"threshold": 0.5} for head in ("loop_within_h", "fails_to_commit")}
    card = {"base_model": {"name": name, "hidden_size": hidden_size},
            "calibration": {"stride": 2, "patience": 1, "heads": heads, "plan": {"threshold": 0.5}}}
    return save_detector(folder, probe, recipe, stats, card)


def run_failing(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err and err[-1].startswith("error: ")
    return err[-1]


def decode_report(path, shape="qwen3-8b"):
    """A benchmarks/decode.py result in miniature: bf16 and two 2-bit kernels at batch 1 and 16, 1k and 8k."""
    rows = []
    for batch in (1, 16):
        for context, ms in ((1024, 6.0), (8192, 8.0)):
            rows.append({"shape": shape, "precision": "bf16", "kernel": "cuBLAS", "batch": batch, "context": context,
                         "step_seconds": ms * batch ** 0.5 / 1e3})
            rows.append({"shape": shape, "precision": "2bit", "kernel": "fused", "batch": batch, "context": context,
                         "step_seconds": ms / 4 * batch ** 0.5 / 1e3})
            rows.append({"shape": shape, "precision": "2bit", "kernel": "gptq-triton", "batch": batch,
                         "context": context, "step_seconds": ms * 3 / 1e3})
    # A compiled variant measured at one point only is faster there but cannot be interpolated: ignored.
    rows.append({"shape": shape, "precision": "2bit", "kernel": "fused + compile", "batch": 16, "context": 1024,
                 "step_seconds": 1e-6})
    shapes = {shape: {"loop_b1_1k_bf16": {"prefill_per_token": 1e-5},
                      "loop_b1_1k_2bit_fused": {"prefill_per_token": 2e-5}}}
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "rows": rows, "shapes": shapes}))
    return path


def test_projected_costs_pick_the_nearest_batch_the_fastest_kernel_and_interpolate_context(tmp_path):
    from inference.evaluation.compare import load_projection
    from inference.evaluation.evaluate import ProblemRecord

    projection = load_projection(decode_report(tmp_path / "decode.json"), "qwen3-8b", batch=12)
    assert projection.batch == 16
    assert projection.decode("fp16", 1024) == pytest.approx(6.0 * 4 / 16 / 1e3)
    assert projection.decode("2bit", 1024) == pytest.approx(6.0 / 4 * 4 / 16 / 1e3)  # fused, not gptq-triton
    assert projection.kernels == {"fp16": "cuBLAS", "2bit": "fused"}
    assert projection.decode("fp16", 100) == projection.decode("fp16", 1024)  # clamped below the first point
    middle = projection.decode("fp16", (1024 + 8192) / 2)
    assert middle == pytest.approx((projection.decode("fp16", 1024) + projection.decode("fp16", 8192)) / 2)
    record = ProblemRecord("p", "rule", 0, prompt_tokens=1000, generated_tokens=48, finish_reason="eos",
                           closed_think=True, loop=False, answer="1", gold="1", correct=True, wall_seconds=0.0,
                           text="", tokens_2bit=40, tokens_fp16=8, prefill_2bit=1000, prefill_fp16=1100,
                           checks_fp16=3, passes_2bit=2, passes_fp16=1)
    # Every prefill pass and step check also reads its model's weights once: one decode step each.
    expected = ((40 + 2) * projection.decode("2bit", 1024) + (8 + 1 + 3) * projection.decode("fp16", 1024)
                + 1000 * 2e-5 + 1100 * 1e-5)
    assert projection.seconds(record) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no measured decode steps for shape 'qwen3-0.6b'"):
        load_projection(tmp_path / "decode.json", "qwen3-0.6b", batch=1)


def test_compare_runs_every_method_on_the_same_problems(setup, tmp_path):
    detector = _detector(tmp_path / "detector")
    out = tmp_path / "cmp"
    costs = decode_report(tmp_path / "decode.json")
    assert main(["compare", "--config", str(setup), "--rescue.detector", str(detector), "--out", str(out),
                 "--costs", str(costs), "--shape", "qwen3-8b"]) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    methods = comparison["methods"]
    # A two-head detector: no budget curve; no step ceiling off generated arithmetic.
    assert list(methods) == ["fp16", "2bit", "rule", "learned", "plan-only", "rescue-only", "ceiling-loop"]
    assert methods["learned"]["policy"] == "earliest-candidate"
    assert [c["ceiling"] for c in comparison["ceilings"]] == ["commit-oracle", "ceiling-loop", "fp16"]
    ids = {m: [json.loads(line)["problem_id"] for line in (out / m / "records.jsonl").read_text().splitlines()]
           for m in methods}
    assert all(v == ids["fp16"] for v in ids.values()) and len(ids["fp16"]) == 4
    for precision in ("fp16", "2bit"):
        costs = comparison["costs"][precision]
        assert costs["decode_seconds_per_token"] > 0 and costs["prefill_seconds_per_token"] > 0
    # The naive methods spend tokens of one precision only; plan-only spends FP16 tokens on every plan.
    assert methods["fp16"]["mean_tokens_2bit"] == 0 and methods["2bit"]["mean_tokens_fp16"] == 0
    assert methods["plan-only"]["actions"]["plan"] == 4 and methods["plan-only"]["mean_tokens_fp16"] > 0
    assert "plan" not in methods["rescue-only"]["actions"]
    assert methods["fp16"]["modeled_seconds"] > 0 and methods["2bit"]["weight_bytes_read"] > 0
    low, high = methods["2bit"]["accuracy_ci95"]
    assert 0 <= low <= methods["2bit"]["accuracy"] <= high <= 1
    assert (out / "accuracy-vs-cost.png").stat().st_size > 0 and (out / "tokens.png").stat().st_size > 0
    assert "| learned |" in (out / "comparison.md").read_text()
    # The rule's false-alarm rate on the healthy naive 2-bit traces is stated, not hidden.
    check = comparison["rule_loop_check"]
    assert check["healthy"] + check["loops"] <= 4 and "false_alarm_rate" in check
    assert "The rule on the naive 2-bit traces: rule loop check" in (out / "comparison.md").read_text()
    # Projected to Qwen3-8B's measured costs: FP16-only traces cost their tokens at the bf16 rate.
    assert comparison["projection"]["shape"] == "qwen3-8b" and comparison["projection"]["batch"] == 1
    fp16_records = [json.loads(line) for line in (out / "fp16" / "records.jsonl").read_text().splitlines()]
    expected = sum((r["tokens_fp16"] + r["passes_fp16"]) * 6.0e-3 + r["prefill_fp16"] * 1e-5  # contexts < 1k
                   for r in fp16_records)
    assert all(r["passes_fp16"] == 1 for r in fp16_records)  # one batch each
    assert methods["fp16"]["projected_seconds"] == pytest.approx(expected)
    assert all(m["projected_seconds"] > 0 for m in methods.values())
    assert "projected s (x FP16)" in (out / "comparison.md").read_text()


def test_evaluate_one_rescue_method(setup, tmp_path):
    out = tmp_path / "rule"
    assert main(["evaluate", "--config", str(setup), "--method", "rule", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "rule" and summary["problems"] == 4 and summary["actions"]["plan"] == 4


@pytest.mark.parametrize("make, extra, message", [
    (None, [], "no detector artifact here; train one with `rescue train`"),
    (dict(name="other"), [], "detector trained for model 'other', not 'tiny'"),
    (dict(hidden_size=32), [], "detector reads hidden size 32, but the model has hidden size 64"),
    (dict(layers=(0,)), [], "detector reads layers [0], but the model is configured with layers [-1]"),
])
def test_learned_refuses_a_missing_or_foreign_detector_before_generating(setup, tmp_path, capsys, make, extra,
                                                                          message):
    folder = tmp_path / "detector"
    if make is not None:
        _detector(folder, **make)
    out = tmp_path / "never"
    line = run_failing(capsys, ["compare", "--config", str(setup), "--methods", "learned",
                                "--rescue.detector", str(folder), "--out", str(out), *extra])
    assert message in line
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--methods", "plan-only", "--rescue.plan_tokens", "0"], "rescue.plan_tokens: the plan budget must be a positive"),
    (["--methods", "rule", "--rescue.plan_tokens", "0"], "rescue.plan_tokens"),
    (["--methods", "rule", "--model.fp16", "/no/such/model"], "model folder /no/such/model does not exist"),
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--methods", "rule", "--rescue.rule_window", "1"], "rescue.rule_window"),
    (["--methods", "rule", "--costs", "/no/decode.json", "--shape", "qwen3-8b"], "/no/decode.json: no such decode"),
    (["--methods", "rule", "--costs", "/no/decode.json"], "--shape 'tiny' is not a Qwen3 shape"),
    (["--methods", "2bit", "--model.kernel", "fused"], "model.kernel fused runs on a CUDA GPU only, not on cpu"),
    (["--methods", "2bit", "--model.kernel", "fused-grouped"], "model.kernel fused-grouped runs on a CUDA GPU only"),
])
def test_bad_rescue_settings_fail_before_generation(setup, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    line = run_failing(capsys, ["compare", "--config", str(setup), "--out", str(out), *argv])
    assert message in line
    assert not out.exists()


def test_run_skips_quantize_only_when_the_2bit_folder_matches_the_config(setup):
    config = load_config(setup)
    assert _quantized_matches(config)
    config.quantization.group_size = 64
    assert not _quantized_matches(config)
    config = load_config(setup, {"model.quantized": "/no/such/folder"})
    assert not _quantized_matches(config)


def test_the_goals_count_a_step_check_as_an_fp16_token_and_name_ceilings_only_for_a_missed_goal():
    from rescue.commands import rescue_goals

    def summary(accuracy, ci, fp16_tokens, checks=0.0, read=1.0):
        return {"accuracy": accuracy, "accuracy_ci95": ci, "mean_tokens_fp16": fp16_tokens,
                "mean_checks_fp16": checks, "weight_bytes_read": read}

    methods = {"fp16": summary(0.9, [0.85, 0.95], 300, read=100.0), "2bit": summary(0.2, [0.15, 0.25], 0, read=25.0),
               "rule": summary(0.25, [0.2, 0.3], 50, read=37.0),
               "learned": summary(0.8, [0.75, 0.85], 10, checks=35, read=30.0)}
    ceilings = [{"ceiling": "commit-oracle", "accuracy": 0.3, "memory_bound_x_fp16": 0.2}]
    goals = {g["goal"].split(" ")[1]: g for g in rescue_goals(methods, ceilings, model="tiny-s")}
    assert goals["rescue"]["met"] and "ceiling" not in goals["rescue"]["value"]
    beats = goals["beats"]
    assert beats["met"] and "FP16 tokens 45 (incl. 35 checks) vs 50" in beats["value"]
    methods["learned"]["mean_checks_fp16"] = 45  # 55 FP16 passes: more than the rule's 50
    assert not {g["goal"].split(" ")[1]: g for g in rescue_goals(methods, ceilings, "tiny-s")}["beats"]["met"]
    methods["learned"]["accuracy"] = 0.3  # far below 60% of the gap, and above the only cheap ceiling
    missed = rescue_goals(methods, ceilings, model="tiny-m")[0]
    assert not missed["met"] and "commit-oracle 30.0%" in missed["value"]


def test_rule_at_a_budget_runs_the_rule_the_detector_card_tuned_for_it():
    from types import SimpleNamespace

    from inference.control.triggers import RuleTrigger
    from inference.evaluation.compare import build_trigger, rule_budget, tuned_rule
    from training.tokenizer import build_tokenizer

    assert rule_budget("rule@0.2") == 0.2 and rule_budget("rule") is None and rule_budget("learned@0.2") is None
    with pytest.raises(ValueError, match="must be a number in"):
        rule_budget("rule@2")
    entries = [{"fp16_budget": 0.0, "count": 8, "window": 128, "plan": False, "on_alarm": "commit"},
               {"fp16_budget": 0.2, "count": 3, "window": 512, "plan": True, "on_alarm": "fallback"}]
    detector = SimpleNamespace(card={"calibration": {"rules": {"for_budget": {"budgets": entries}}}})
    assert tuned_rule(detector, 0.1) == entries[0] and tuned_rule(detector, 0.5) == entries[1]
    trigger = build_trigger("rule@0.3", load_config("tiny-s"), build_tokenizer(), detector)
    assert isinstance(trigger, RuleTrigger) and (trigger.count, trigger.window, trigger.plan) == (3, 512, True)
    assert "rule-tuned@0.2" in trigger.policy_name and "on alarm fallback" in trigger.policy_name
    # A card from before the tuning: one clear error.
    old = SimpleNamespace(card={"calibration": {"rules": {"ngram": {}}}})
    with pytest.raises(ValueError, match="rule tuned per FP16 budget"):
        build_trigger("rule@0.2", load_config("tiny-s"), build_tokenizer(), old)
