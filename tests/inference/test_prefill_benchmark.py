"""The prefill benchmark's CPU smoke run: a shrunk Qwen3 prefills in float32, then as GPTQModel 2-bit modules
wrapped by Fused2BitLinear through both prefill paths (the project's dequantization in Triton's
interpreter), and the two paths give the same logits."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("gptqmodel")

ROOT = Path(__file__).resolve().parents[2]


def test_prefill_smoke_run_times_bf16_and_both_2bit_paths(tmp_path):
    out = tmp_path / "prefill.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "prefill.py"), "--shape", "qwen3-0.6b", "--override",
               "num_hidden_layers=1", "hidden_size=256", "intermediate_size=512", "num_attention_heads=2",
               "num_key_value_heads=1", "vocab_size=1000", "--prompts", "80", "--out", str(out)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    report = json.loads(out.read_text())
    assert set(report["prefill"]) == {"bf16_80", "2bit_gptqmodel_80", "2bit_dequantize_80"}
    assert all(entry["seconds"] > 0 and entry["tokens"] == 80 for entry in report["prefill"].values())
    assert report["quantized_linears"] == 7
    assert report["logits_relative_difference"] < 1e-5  # the same W, multiplied the same way
    assert report["dequantize"]["dequantize"]["bytes_per_layer"] > 0
    assert "| 2-bit, dequantize | 80 |" in done.stdout
