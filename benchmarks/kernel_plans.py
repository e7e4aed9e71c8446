"""Benchmark: the fused 2-bit kernel's launch plans on one GPU, against each linear's floor.

`launch_plan` (`inference/decoding/kernels.py`) chooses the N block, the split of K and the warps from the
shape alone; its choices were measured on an H100. This
times the alternatives on the machine at hand, for every linear shape of one decoder layer of a Qwen3
shape (q, k, v, o, gate, up, down, and the grouped q+k+v and gate+up calls of `Grouped2BitLinear`) at
each row count: every plan of the grid below runs the shape's linear of every layer in turn (random
2-bit buffers at group 128, one per layer, so no weight is read from L2 twice), in one CUDA graph.

    grid: programs per SM {2, 3, 4, 6} x block_n {64, 128, 256} x warps {2, 4, 8}
          (each a flag: --programs-per-sm, --block-n, --warps)

Each plan's output on layer 0 is checked against the shipped plan's (they differ only by the order of
float32 sums). The floor of a call is its packed bytes (codes, zero points, scales) over the measured
copy rate. The summary adds a layer's calls up: seven linears, or four with the projections grouped,
under the shipped plan and under the best plan found for each shape.

    python3 benchmarks/kernel_plans.py --shape qwen3-8b --rows 1 4 16 --out kernel-plans.json

On a CPU (Triton's interpreter, `TRITON_INTERPRET=1`) it runs as a smoke test of itself: its timings
mean nothing there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import copy_bandwidth  # noqa: E402
from decode_step import LINEAR_NAMES, timed  # noqa: E402

from inference.decoding import kernels  # noqa: E402
from inference.decoding.shapes import QWEN3_SHAPES, linear_shapes  # noqa: E402

CUDA = torch.cuda.is_available()
GROUP = 128
PROGRAMS_PER_SM = (2, 3, 4, 6)
BLOCK_N = (64, 128, 256)
WARPS = (2, 4, 8)


SEVEN = LINEAR_NAMES
FOUR = ("qkv grouped", "o_proj", "gate_up grouped", "down_proj")


def layer_calls(spec: dict) -> dict[str, tuple[int, int]]:
    """(K, N) of every kernel call of a decoder layer: the seven linears and the two grouped calls."""
    calls = dict(zip(SEVEN, linear_shapes(spec)))
    calls["qkv grouped"] = (calls["q_proj"][0], sum(calls[name][1] for name in SEVEN[:3]))
    calls["gate_up grouped"] = (calls["gate_proj"][0], 2 * calls["gate_proj"][1])
    return calls


def random_buffers(K: int, N: int, layers: int, device) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator(device=device).manual_seed(K * 7 + N)
    low, high = -(2**31), 2**31 - 1
    buffers = []
    for _ in range(layers):
        qweight = torch.randint(low, high, (K // 16, N), dtype=torch.int32, device=device, generator=generator)
        qzeros = torch.randint(low, high, (K // GROUP, N // 16), dtype=torch.int32, device=device, generator=generator)
        scales = (torch.rand(K // GROUP, N, device=device, generator=generator) * 0.02).to(torch.bfloat16)
        buffers.append((qweight, qzeros, scales))
    return buffers


def packed_bytes(K: int, N: int) -> int:
    return K * N // 4 + (K // GROUP) * (N // 16) * 4 + (K // GROUP) * N * 2


def run_plan(x: torch.Tensor, buffers, out: torch.Tensor, plan: dict) -> None:
    for qweight, qzeros, scales in buffers:
        kernels._launch(x, qweight, qzeros, scales, None, out, GROUP, plan)


def seconds_per_call(x, buffers, out, plan: dict, repeats: int) -> float:
    """Seconds per call, every layer's buffers in turn: one CUDA graph replayed `repeats` times (on a CPU,
    eager passes)."""
    return timed(lambda: run_plan(x, buffers, out, plan), repeats) / len(buffers)


def plan_grid(rows: int, K: int, N: int, sms: int, grid: tuple = (PROGRAMS_PER_SM, BLOCK_N, WARPS)
              ) -> list[tuple[dict, dict]]:
    """(choices, plan) for every point of `grid` (programs per SM, block_n, warps), the shipped plan first
    (choices {})."""
    plans = [({}, kernels.launch_plan(rows, K, N, GROUP))]
    for per_sm, block_n, warps in itertools.product(*grid):
        choices = {"programs_per_sm": per_sm, "block_n": block_n, "num_warps": warps}
        plans.append((choices, kernels.launch_plan(rows, K, N, GROUP, programs=per_sm * sms, block_n=block_n,
                                                   num_warps=warps)))
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-8b", choices=list(QWEN3_SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--calls", nargs="+", default=None, help="calls to time (default: all of a layer's)")
    parser.add_argument("--layers", type=int, default=None, help="weight sets per call (default: the shape's layers)")
    parser.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="shape fields to change, e.g. hidden_size=256 (a CPU smoke run)")
    parser.add_argument("--grid", choices=("full", "small"), default="full",
                        help="small: the shipped plan and one other (a CPU smoke run)")
    parser.add_argument("--programs-per-sm", nargs="+", type=int, default=list(PROGRAMS_PER_SM))
    parser.add_argument("--block-n", nargs="+", type=int, default=list(BLOCK_N))
    parser.add_argument("--warps", nargs="+", type=int, default=list(WARPS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=500.0, help="seconds after which no new call is timed")
    parser.add_argument("--out", default="kernel-plans.json")
    args = parser.parse_args()
    began = time.perf_counter()
    torch.set_grad_enabled(False)

    spec = {**QWEN3_SHAPES[args.shape],
            **{field: int(value) for field, value in (item.split("=") for item in args.override)}}
    layers = args.layers or spec["num_hidden_layers"]
    device = torch.device("cuda" if CUDA else "cpu")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if CUDA else kernels.H100_SMS
    bandwidth = copy_bandwidth() if CUDA else 1e11
    calls = layer_calls(spec)
    names = args.calls or list(calls)
    report = {"device": torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
              "torch": torch.__version__, "triton": getattr(kernels.triton, "__version__", None),
              "python": platform.python_version(), "shape": args.shape, "spec": spec, "layers": layers,
              "sms": sms, "copy_bandwidth_bytes_per_s": bandwidth, "group_size": GROUP, "calls": {}}
    print(f"{report['device']}: {sms} SMs, copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)

    for name in names:
        K, N = calls[name]
        buffers = random_buffers(K, N, layers, device)
        floor_us = packed_bytes(K, N) / bandwidth * 1e6
        entry = report["calls"][name] = {"K": K, "N": N, "floor_us": floor_us}
        for rows in args.rows:
            if time.perf_counter() - began > args.deadline:
                entry[f"rows_{rows}"] = {"skipped": "deadline"}
                continue
            x = torch.randn(rows, K, device=device, dtype=torch.bfloat16 if CUDA else torch.float32)
            out = torch.empty(rows, N, device=device, dtype=x.dtype)
            results, reference = [], None
            grid = plan_grid(rows, K, N, sms, (args.programs_per_sm, args.block_n, args.warps))
            if args.grid == "small":
                grid = grid[:2]
            for choices, plan in grid:
                try:
                    kernels._launch(x, *buffers[0], None, out, GROUP, plan)
                    first = out.float().clone()
                    if reference is None:
                        reference = first
                    error = float((first - reference).abs().max() / reference.abs().max().clamp(min=1e-30))
                    us = seconds_per_call(x, buffers, out, plan, args.repeats) * 1e6
                except Exception as failure:  # noqa: BLE001 - a plan that does not compile is a finding
                    results.append({"choices": choices, "error": f"{type(failure).__name__}: {failure}"[:300]})
                    continue
                results.append({"choices": choices, "split_k": plan["split_k"], "block_n": plan["block_n"],
                                "num_warps": plan["num_warps"], "us": us,
                                "x_floor": us / floor_us, "max_diff_vs_shipped": error})
            measured = [r for r in results if "us" in r]
            shipped = results[0] if "us" in results[0] else None
            best = min(measured, key=lambda r: r["us"]) if measured else None
            entry[f"rows_{rows}"] = {"shipped": shipped, "best": best, "plans": results}
            if shipped and best:
                print(f"{name:16s} rows {rows:3d}: floor {floor_us:7.2f} us, shipped {shipped['us']:8.2f} us "
                      f"({shipped['x_floor']:.2f}x), best {best['us']:8.2f} us ({best['x_floor']:.2f}x) "
                      f"{best['choices']} split {best['split_k']}  ({time.perf_counter() - began:.0f} s)", flush=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
        del buffers
        if CUDA:
            torch.cuda.empty_cache()

    report["layer"] = layer_summary(report, args.rows)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(tables(report))


def layer_summary(report: dict, rows_list) -> dict:
    """A layer's calls added up, seven or four (grouped), under the shipped plan and each shape's best."""
    summary = {}
    for label, members in (("seven linears", SEVEN), ("four calls (grouped)", FOUR)):
        for rows in rows_list:
            entries = [report["calls"].get(name, {}).get(f"rows_{rows}", {}) for name in members]
            if not all(e.get("shipped") and e.get("best") for e in entries):
                continue
            floor = sum(report["calls"][name]["floor_us"] for name in members)
            shipped = sum(e["shipped"]["us"] for e in entries)
            best = sum(e["best"]["us"] for e in entries)
            summary[f"{label}, rows {rows}"] = {"floor_us": floor, "shipped_us": shipped, "best_us": best,
                                                "shipped_x_floor": shipped / floor, "best_x_floor": best / floor}
    return summary


def tables(report: dict) -> str:
    lines = ["| call | rows | floor us | shipped plan us (x floor) | best plan us (x floor) | best plan |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, entry in report["calls"].items():
        for key, value in entry.items():
            if not key.startswith("rows_") or not value.get("best"):
                continue
            shipped, best = value["shipped"], value["best"]
            choices = ", ".join(f"{k} {v}" for k, v in best["choices"].items()) or "shipped"
            lines.append(f"| {name} | {key[5:]} | {entry['floor_us']:.2f} | {shipped['us']:.2f} ({shipped['x_floor']:.2f}x) "
                         f"| {best['us']:.2f} ({best['x_floor']:.2f}x) | {choices}, split {best['split_k']} |")
    lines += ["", "| layer | floor us | shipped us (x floor) | best per call us (x floor) |", "| --- | ---: | ---: | ---: |"]
    for label, value in report.get("layer", {}).items():
        lines.append(f"| {label} | {value['floor_us']:.2f} | {value['shipped_us']:.2f} ({value['shipped_x_floor']:.2f}x) "
                     f"| {value['best_us']:.2f} ({value['best_x_floor']:.2f}x) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
