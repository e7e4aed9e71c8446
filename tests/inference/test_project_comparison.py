"""benchmarks/project_comparison.py prices a stored comparison at measured costs; --prefill replaces the
prefill costs with a benchmarks/prefill.py record's, and refuses one of another shape."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "project_comparison.py"
COMPARISON = ROOT / "docs" / "rescue" / "tiny-m-h100-cal96-report.json"
COSTS = ROOT / "benchmarks" / "results" / "decode-h200-run1.json"


def project(*extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(COMPARISON), str(COSTS), "--shapes", "qwen3-8b",
                           "--batches", "1", "--budget", "1024", *map(str, extra)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def row(output: str, method: str) -> list[str]:
    return next(line.split(" | ") for line in output.splitlines() if line.startswith(f"| qwen3-8b | 1 | {method} |"))


def prefill_record(path: Path, shape: str = "qwen3-8b") -> Path:
    entries = {f"{precision}_{tokens}": {"precision": precision.split("_")[0], "path": path_name, "tokens": tokens,
                                        "seconds": per_token * tokens, "per_token": per_token}
               for precision, path_name, per_token in (("bf16", "cuBLAS", 6e-5), ("2bit_gptqmodel", "gptqmodel", 2e-4),
                                                       ("2bit_dequantize", "dequantize", 7e-5))
               for tokens in (256, 1024)}
    path.write_text(json.dumps({"shape": shape, "overrides": {}, "prefill": entries}))
    return path


def test_prefill_record_replaces_the_prefill_costs_only(tmp_path):
    before = project()
    after = project("--prefill", prefill_record(tmp_path / "prefill.json"))
    assert before.returncode == 0 and after.returncode == 0, before.stderr + after.stderr

    assert "prefill ms/token: 2-bit 0.070, FP16 0.060" in after.stdout
    learned_before, learned_after = row(before.stdout, "learned"), row(after.stdout, "learned")
    assert learned_after[-1] == learned_before[-1]  # decoding alone is unchanged
    assert float(learned_after[-2].split()[0]) < float(learned_before[-2].split()[0])  # cheaper 2-bit prefills


def test_prefill_record_of_another_shape_is_refused(tmp_path):
    done = project("--prefill", prefill_record(tmp_path / "prefill.json", shape="qwen3-32b"))
    assert done.returncode != 0
    assert "prefill.json: measured shape 'qwen3-32b'" in done.stderr and "not 'qwen3-8b'" in done.stderr


def test_every_prefill_pass_and_check_is_priced_at_one_decode_step_of_its_model():
    from types import SimpleNamespace

    from conftest import benchmark_script

    projected_seconds = benchmark_script("project_comparison").projected_seconds
    costs = SimpleNamespace(decode=lambda precision, context: {"2bit": 2.0, "fp16": 5.0}[precision],
                            prefill={"2bit": 0.25, "fp16": 0.5})
    summary = {"problems": 10, "mean_tokens_2bit": 100, "mean_tokens_fp16": 20, "mean_prefill_2bit": 40,
               "mean_prefill_fp16": 30, "mean_checks_fp16": 3}
    older = projected_seconds(summary, costs)  # a comparison from before passes were counted
    assert older == 10 * (100 * 2.0 + 20 * 5.0 + 40 * 0.25 + 30 * 0.5 + 3 * 5.0)
    counted = projected_seconds({**summary, "mean_passes_2bit": 4, "mean_passes_fp16": 2}, costs)
    assert counted == older + 10 * (4 * 2.0 + 2 * 5.0)
    assert projected_seconds(summary, costs, prefill=False) == 10 * (100 * 2.0 + 20 * 5.0)


def test_each_batch_takes_both_precisions_from_the_record_with_the_fastest_bf16_step(tmp_path):
    from conftest import benchmark_script

    module = benchmark_script("project_comparison")

    def record(name, rows):
        steps = [{"precision": p, "kernel": k, "attention": "split", "batch": b, "context": 1024, "step_seconds": t}
                 for p, k, b, t in rows]
        path = tmp_path / name
        path.write_text(json.dumps({"shape": "qwen3-8b", "steps": steps}))
        return path

    compiled_1 = record("a.json", [("bf16", "cuBLAS", 1, 0.010), ("bf16", "cuBLAS + compile", 1, 0.007),
                                   ("2bit", "fused grouped + compile", 1, 0.003), ("bf16", "cuBLAS", 16, 0.012),
                                   ("2bit", "fused grouped", 16, 0.009)])
    compiled_16 = record("b.json", [("bf16", "cuBLAS", 1, 0.0101), ("2bit", "fused grouped", 1, 0.0061),
                                    ("bf16", "cuBLAS + compile", 16, 0.0084), ("2bit", "fused grouped", 16, 0.0092),
                                    ("2bit", "fused grouped + compile", 16, 0.0054)])
    steps = module.fastest_steps_of([compiled_1, compiled_16], "qwen3-8b")
    assert steps["bf16", 1][1:] == (0.007, "cuBLAS + compile, split")
    assert steps["2bit", 1][1:] == (0.003, "fused grouped + compile, split")
    assert steps["bf16", 16][1] == 0.0084 / 16 and steps["2bit", 16][1] == 0.0054 / 16
    # A record that measured only one precision at a batch supplies nothing there.
    lone = record("c.json", [("bf16", "cuBLAS + compile", 16, 0.001)])
    assert module.fastest_steps_of([compiled_16, lone], "qwen3-8b")["bf16", 16][1] == 0.0084 / 16


def test_steps_left_out_by_kernel_name_are_not_priced(tmp_path):
    from conftest import benchmark_script

    module = benchmark_script("project_comparison")
    steps = [{"precision": p, "kernel": k, "attention": "split", "batch": 1, "context": 1024, "step_seconds": t}
             for p, k, t in (("bf16", "cuBLAS + compile", 0.007), ("2bit", "fused grouped + compile", 0.0032),
                             ("2bit", "fused grouped + compile, sums in torch", 0.0031))]
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"shape": "qwen3-8b", "steps": steps}))
    assert module.fastest_steps_of([path], "qwen3-8b")["2bit", 1][1] == 0.0031
    kept = module.fastest_steps_of([path], "qwen3-8b", ("sums in torch",))
    assert kept["2bit", 1][1:] == (0.0032, "fused grouped + compile, split")
    assert kept["bf16", 1][1] == 0.007
