"""The kernel-plan benchmark's CPU smoke run: Triton's interpreter runs the shipped plan and the grid's first
plan of a tiny layer's calls, and the record says what each plan chose and how far its output is from the
shipped plan's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_plans_smoke_run_records_each_plan_against_the_shipped_one(tmp_path):
    out = tmp_path / "plans.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "kernel_plans.py"), "--shape", "qwen3-0.6b", "--override",
               "hidden_size=256", "intermediate_size=512", "num_attention_heads=2", "num_key_value_heads=1",
               "--layers", "1", "--rows", "1", "4", "--calls", "k_proj", "qkv grouped", "--grid", "small",
               "--repeats", "1", "--out", str(out)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    report = json.loads(out.read_text())
    assert set(report["calls"]) == {"k_proj", "qkv grouped"}
    assert (report["calls"]["k_proj"]["K"], report["calls"]["k_proj"]["N"]) == (256, 128)
    assert report["calls"]["qkv grouped"]["N"] == 2 * 128 + 2 * 128  # q (2 heads) + k + v (1 head each)
    for call in report["calls"].values():
        for rows in (1, 4):
            plans = call[f"rows_{rows}"]["plans"]
            assert len(plans) == 2 and plans[0]["choices"] == {}
            assert plans[1]["choices"] == {"programs_per_sm": 2, "block_n": 64, "num_warps": 2}
            assert all(p["us"] > 0 and p["max_diff_vs_shipped"] <= 1e-6 for p in plans)
    assert report["layer"] == {}  # a layer's sum needs every call of it
    assert "| k_proj | 1 |" in done.stdout
