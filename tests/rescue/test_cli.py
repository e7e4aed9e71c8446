"""The `rescue` commands end to end on a tiny random Qwen3 (CPU, no downloads)."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from rescue.cli import main


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, tiny_model_dir, arith_jsonl):
    folder = tmp_path_factory.mktemp("cli")
    config = {
        "model": {"name": "tiny", "fp16": str(tiny_model_dir), "device": "cpu"},
        "sampling": {"budget": 8, "batch_size": 4},
        "quantization": {"bits": 2, "group_size": 32,
                         "calibration": {"benchmark": "arith", "split": "train", "size": 8}},
        "probe": {"layers": [-1]},
        "benchmark": {"name": "gsm8k", "split": "test", "path": str(arith_jsonl)},
        "wandb": {"mode": "offline"},
        "output_dir": str(folder / "runs"),
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def quantized_dir(tiny_config):
    assert main(["quantize", "--config", str(tiny_config)]) == 0
    return tiny_config.parent / "runs" / "tiny-2bit"


def run_failing(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err and err[-1].startswith("error: ")
    return err[-1]


def test_quantize_writes_a_2bit_gptq_folder(quantized_dir):
    settings = json.loads((quantized_dir / "quantize_config.json").read_text())
    assert settings["bits"] == 2 and settings["group_size"] == 32
    assert (quantized_dir / "tokenizer.json").is_file()
    assert not quantized_dir.with_name("tiny-2bit.partial").exists()


def test_a_2bit_model_is_up_to_date_only_for_the_modules_it_kept_in_full_precision(tiny_config, quantized_dir):
    from inference.config import load_config
    from rescue.commands import _quantized_matches

    assert _quantized_matches(load_config(tiny_config))
    assert not _quantized_matches(load_config(tiny_config, {"quantization.keep_fp16": ["mlp"]}))
    assert not _quantized_matches(load_config(tiny_config, {"quantization.wider": ["mlp"]}))
    # A record from before keep_fp16 and wider existed quantized every linear to one width: still up to date.
    record = quantized_dir / "rescue_quantize.json"
    text = record.read_text()
    made = json.loads(text)
    del made["quantization"]["keep_fp16"], made["quantization"]["wider"], made["quantization"]["wider_bits"]
    record.write_text(json.dumps(made))
    try:
        assert _quantized_matches(load_config(tiny_config))
    finally:
        record.write_text(text)


def test_2bit_model_generates_with_gptq_kernels_and_dequantized_weights_alike(quantized_dir):
    import torch
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    from inference.decoding.generate import generate
    from inference.decoding.models import load_quantized
    from inference.prompts import render_prompt

    packed, tokenizer = load_quantized(str(quantized_dir), "cpu", kernel="gptq")
    assert any(isinstance(m, TorchLinear) for m in packed.modules())
    plain, _ = load_quantized(str(quantized_dir), "cpu", kernel="dequantized")
    assert not any(isinstance(m, TorchLinear) for m in plain.modules())
    enc = tokenizer([render_prompt(tokenizer, "What is 2 + 3?")], return_tensors="pt")
    with torch.no_grad():
        a = packed(**enc).logits.float()
        b = plain(**enc).logits.float()
    assert torch.allclose(a, b, atol=0.05 * b.abs().max().item())
    result = generate(plain, enc.input_ids, enc.attention_mask, max_new_tokens=5,
                      eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    assert len(result.generated_ids[0]) >= 1


@pytest.mark.parametrize("method", ["fp16", "2bit"])
def test_evaluate_writes_a_record_and_a_summary(tiny_config, quantized_dir, method, capsys):
    out = tiny_config.parent / f"eval-{method}"
    assert main(["evaluate", "--config", str(tiny_config), "--method", method, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{method} on gsm8k/test (4 problems): accuracy" in printed
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["method"] for r in rows} == {method}
    assert all(r["finish_reason"] in ("eos", "budget") and 1 <= r["generated_tokens"] <= 8 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 4
    assert sum(summary["finish_reasons"].values()) == 4
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert list((tiny_config.parent / "wandb").glob("offline-run-*")), "an offline W&B run is written"


def test_limit_evaluates_the_first_problems(tiny_config, quantized_dir, tmp_path):
    out = tmp_path / "two"
    assert main(["evaluate", "--config", str(tiny_config), "--method", "2bit", "--limit", "2",
                 "--wandb", "disabled", "--out", str(out)]) == 0
    assert len((out / "records.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.fp16", "/no/such/model"], "model folder /no/such/model does not exist"),
        (["--model.fp16", "Qwen/NoSuchModel-0B"], "model Qwen/NoSuchModel-0B is not available offline (no such local folder, not in the Hugging Face cache); pass a local folder"),
        (["--budget", "0"], "field 'sampling.budget' must be a positive integer, got 0"),
        (["--limit", "0"], "--limit must be a positive integer, got 0"),
        (["--benchmark", "nope"], "nope"),
        (["--quantization.keep_fp16", "[mlp, '(attn']"],
         "field 'quantization.keep_fp16[1]' must be a regular expression, got '(attn'"),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(tiny_config, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    line = run_failing(capsys, ["evaluate", "--config", str(tiny_config), "--method", "fp16",
                                "--wandb", "disabled", "--out", str(out), *extra])
    assert message in line
    assert not out.exists() and not out.with_name("never.partial").exists()


def test_empty_benchmark_file_is_refused(tiny_config, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = run_failing(capsys, ["evaluate", "--config", str(tiny_config), "--benchmark.path", str(empty),
                                "--wandb", "disabled", "--out", str(tmp_path / "x")])
    assert "empty.jsonl" in line and "no problems" in line


def test_missing_2bit_model_says_how_to_make_it(tiny_config, tmp_path, capsys):
    line = run_failing(capsys, ["evaluate", "--config", str(tiny_config), "--method", "2bit",
                                "--model.quantized", str(tmp_path / "absent"), "--wandb", "disabled"])
    assert "2-bit model folder" in line and "does not exist" in line


def test_full_precision_folder_is_not_a_2bit_model(tiny_config, tiny_model_dir, capsys):
    line = run_failing(capsys, ["evaluate", "--config", str(tiny_config), "--method", "2bit",
                                "--model.quantized", str(tiny_model_dir), "--wandb", "disabled"])
    assert "has no GPTQ quantization config" in line


def test_incomplete_model_folder_and_mismatched_tokenizer_are_named(tiny_config, tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    line = run_failing(capsys, ["evaluate", "--config", str(tiny_config), "--method", "fp16",
                                "--model.fp16", str(broken), "--wandb", "disabled"])
    assert "has no weights" in line

    from transformers import AutoTokenizer

    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_model_dir, mismatched)
    tokenizer = AutoTokenizer.from_pretrained(mismatched)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(200)])
    tokenizer.save_pretrained(mismatched)
    line = run_failing(capsys, ["evaluate", "--config", str(tiny_config), "--method", "fp16",
                                "--model.fp16", str(mismatched), "--wandb", "disabled"])
    assert "tokenizer has" in line and "vocabulary has" in line


def test_missing_config_file_exits_non_zero(capsys, tmp_path):
    line = run_failing(capsys, ["evaluate", "--config", str(tmp_path / "absent.yaml")])
    assert "absent.yaml: config file not found" in line


def test_help_explains_every_option():
    result = subprocess.run([sys.executable, "-m", "rescue.cli", "evaluate", "--help"],
                            capture_output=True, text=True, check=True)
    for flag in ("--method", "--limit", "--sampling.budget", "--quantization.group_size", "--wandb"):
        assert flag in result.stdout
    assert "maximum generated tokens per trace" in result.stdout


def test_main_job_commands_work_from_the_project_root_with_relative_paths(tmp_path, monkeypatch):
    """`rescue quantize` on the shipped tiny-s (relative model path) writes a loadable 2-bit folder."""
    from inference.config import REPO_ROOT  # noqa: F401  (the shipped model lives under the project root)

    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "tiny-s-2bit"
    assert main(["quantize", "--quantization.calibration.size", "4", "--out", str(out)]) == 0
    assert (out / "quantize_config.json").is_file() and not (REPO_ROOT / "logs").exists()


def test_collect_then_label_writes_labels_beside_the_traces_and_a_report(tmp_path, capsys, monkeypatch):
    from inference.config import REPO_ROOT

    monkeypatch.chdir(REPO_ROOT)
    traces = tmp_path / "traces"
    small = ["--budget", "40", "--sampling.batch_size", "3", "--capture.shard_size", "3", "--wandb", "disabled",
             "--model.device", "cpu"]
    assert main(["collect", "--precision", "fp16", "--split", "val", "--limit", "3", "--out", str(traces), *small]) == 0
    assert "bytes per generated token" in capsys.readouterr().out
    assert main(["label", str(traces), "--wandb", "offline"]) == 0
    labels = json.loads((traces / "labels.json").read_text())
    assert labels["params"]["min_repeats"] == 3 and len(labels["traces"]) == 3
    assert all("loop_onset" in row and "fails_to_commit" in row for row in labels["traces"].values())
    assert (traces / "label-report" / "label-report.md").is_file()
    assert list((traces / "label-report").glob("*.png"))


def test_label_refuses_a_folder_that_is_not_a_trace_set(tmp_path, capsys):
    line = run_failing(capsys, ["label", str(tmp_path), "--wandb", "disabled"])
    assert "not a trace set (no manifest.json)" in line


def test_train_refuses_a_trace_set_without_labels(tmp_path, capsys, monkeypatch):
    from inference.config import REPO_ROOT

    monkeypatch.chdir(REPO_ROOT)
    traces = tmp_path / "traces"
    assert main(["collect", "--precision", "fp16", "--split", "val", "--limit", "2", "--budget", "16",
                 "--wandb", "disabled", "--model.device", "cpu", "--out", str(traces)]) == 0
    line = run_failing(capsys, ["train", "--traces", str(traces), "--wandb", "disabled",
                                "--out", str(tmp_path / "detector")])
    assert "labels.json" in line
    assert not (tmp_path / "detector").exists()


@pytest.mark.parametrize("text, with_solution", [("solution", True), ("question", False)])
def test_quantize_calibrates_on_prompts_alone_when_asked(tiny_config, tmp_path, monkeypatch, text, with_solution):
    import inference.decoding.quantize

    seen = {}

    def record(source, out_dir, texts, settings, device):
        seen["texts"] = texts
        return {"out": str(out_dir), "kept_fp16": [], "seconds": 0.0}

    monkeypatch.setattr(inference.decoding.quantize, "quantize_model", record)
    argv = ["quantize", "--config", str(tiny_config), "--quantization.calibration.benchmark", "arith",
            "--quantization.calibration.size", "3", "--quantization.calibration.text", text, "--out", str(tmp_path)]
    assert main(argv) == 0
    assert len(seen["texts"]) == 3
    # arith's worked solutions open the thinking block; the rendered prompt alone never does.
    assert all(("<think>\nPlan:" in t) == with_solution for t in seen["texts"])
    assert all(t.count("Start with") == 1 for t in seen["texts"])


def test_a_family_model_evaluated_off_its_own_generated_task_is_warned_about(tiny_model_dir, tmp_path, capsys):
    from inference.config import load_config
    from rescue.commands import task_mismatch

    hard = tmp_path / "tiny-hard"
    shutil.copytree(tiny_model_dir, hard)
    (hard / "pretrain.json").write_text(json.dumps({"recipe": {"task": "arith-hard"}}))

    def warning(folder, benchmark):
        return task_mismatch(load_config(None, {"model.fp16": str(folder), "benchmark.name": benchmark}))

    assert "trained on 'arith-hard'" in warning(hard, "arith") and "--benchmark arith-hard" in warning(hard, "arith")
    assert warning(hard, "arith-hard") is None and warning(hard, "gsm8k") is None
    assert warning(tiny_model_dir, "arith-xhard") is None  # no pretrain.json: not a family model
    (hard / "pretrain.json").write_text(json.dumps({"model": "tiny-s"}))  # a record from before the tasks
    assert "trained on 'arith'" in warning(hard, "arith-hard") and warning(hard, "arith") is None

    (hard / "pretrain.json").write_text(json.dumps({"recipe": {"task": "arith-hard"}}))
    argv = ["evaluate", "--config", "tiny-s", "--model.fp16", str(hard), "--model.device", "cpu", "--method", "fp16",
            "--limit", "1", "--budget", "4", "--wandb", "disabled", "--out", str(tmp_path / "eval")]
    assert main(argv + ["--benchmark", "arith"]) == 0
    assert capsys.readouterr().err.count("warning: ") == 1
    assert main(argv + ["--benchmark", "arith-hard"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_2bit_twin_of_another_model_is_warned_about(tiny_config, quantized_dir, other_tiny_model_dir, tmp_path,
                                                      capsys):
    from inference.config import load_config
    from rescue.commands import twin_mismatch

    own = load_config(str(tiny_config))
    assert twin_mismatch(own) is None
    other = load_config(str(tiny_config), {"model.fp16": str(other_tiny_model_dir),
                                           "model.quantized": str(quantized_dir)})
    assert str(quantized_dir) in twin_mismatch(other) and "not from model.fp16" in twin_mismatch(other)
    assert main(["evaluate", "--config", str(tiny_config), "--model.fp16", str(other_tiny_model_dir),
                 "--model.quantized", str(quantized_dir), "--method", "2bit", "--limit", "1",
                 "--wandb", "disabled", "--out", str(tmp_path / "eval")]) == 0
    assert capsys.readouterr().err.count("was quantized from") == 1
    unrecorded = tmp_path / "elsewhere"
    shutil.copytree(quantized_dir, unrecorded)
    record = json.loads((unrecorded / "rescue_quantize.json").read_text())
    (unrecorded / "rescue_quantize.json").write_text(json.dumps({**record, "fp16": "/no/such/machine/folder"}))
    assert twin_mismatch(load_config(str(tiny_config), {"model.quantized": str(unrecorded)})) is None


def test_library_logs_go_to_the_run_folder_and_the_console_keeps_the_stage_lines(tiny_config, quantized_dir,
                                                                                 tmp_path, capsys):
    logs = tiny_config.parent / "runs" / "tiny" / "logs"
    # The quantize fixture's GPTQModel lines (later quantize tests that fail early log less).
    assert any("INFO gptqmodel: " in log.read_text() for log in logs.glob("quantize-*.log"))
    assert main(["evaluate", "--config", str(tiny_config), "--method", "2bit", "--limit", "1",
                 "--out", str(tmp_path / "e")]) == 0
    out, err = capsys.readouterr()
    printed = (out + err).splitlines()
    assert not [line for line in printed if line.startswith(("INFO", "Kernel", "Loader", "GPT-QModel"))]
    assert any(line.startswith("2bit on gsm8k/test (1 problems)") for line in printed)
    newest = max(logs.glob("evaluate-*.log"), key=lambda path: path.stat().st_mtime)
    assert "INFO gptqmodel: Kernel: " in newest.read_text()


@pytest.mark.parametrize("argv, line", [
    (["quantize", "--config", "tiny-m"], "quantize: model.quantized training/embedded/tiny-m-2bit is a model shipped "
                                         "with the package; pass --model.quantized DIR"),
    (["quantize", "--config", "tiny-s", "--out", "training/embedded/tiny-s"], "quantize: --out training/embedded/tiny-s "
                                                                               "is a model shipped with the package"),
    (["pretrain", "--config", "tiny-s"], "pretrain: model.fp16 training/embedded/tiny-s is a model shipped with the "
                                         "package; pass --out DIR"),
])
def test_shipped_models_are_never_overwritten(capsys, argv, line):
    from inference.config import REPO_ROOT

    shipped = REPO_ROOT / "training" / "embedded"
    before = {path: path.stat().st_mtime_ns for path in shipped.rglob("*")}
    assert line in run_failing(capsys, argv)
    assert {path: path.stat().st_mtime_ns for path in shipped.rglob("*")} == before


def test_tiny_m_config_uses_its_shipped_twin():
    """rescue run skips quantization for tiny-m: the shipped twin records the config's model and settings."""
    from inference.config import load_config
    from rescue.commands.common import _quantized_matches

    config = load_config("tiny-m")
    assert _quantized_matches(config)
    assert not _quantized_matches(load_config("tiny-m", {"quantization.calibration.size": 64}))
