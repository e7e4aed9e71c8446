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
