"""Decode attention over a partly written static-cache window: what masked positions cost.

A static decode step attends over a window of the cache that holds every slot written so far
(`inference/decoding/steps.py`), so part of the window is past the last written slot and closed by the
mask (up to half of it while the window grew by doubling); a left-padded row's padding is closed too. The split-cache kernel
(`inference/decoding/attention.py`) reads the mask first and does not load the keys and values of
closed positions (`gated`). This times, side by side in one run, each call in a CUDA graph:

- `gated`: the kernel over the whole window, closed positions not loaded (what decoding runs);
- `ungated`: the same kernel loading every position of the window (the kernel before gating);
- `exact`: the kernel over the written positions alone (a window that fits exactly: the floor of gating);
- `floor`: the open positions' key and value bytes over the measured copy rate.

    python benchmarks/attention_mask.py --out attention-mask.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from inference.decoding.attention import decode_attention  # noqa: E402
from inference.decoding.shapes import QWEN3_SHAPES  # noqa: E402


def graph_seconds(work, repeats: int) -> float:
    """Seconds per call of `work`, captured once in a CUDA graph (after one eager run) and replayed."""
    work()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    graph.replay()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - began) / repeats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["qwen3-0.6b", "qwen3-8b"], choices=list(QWEN3_SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--window", type=int, default=8192, help="cache positions the step attends over")
    parser.add_argument("--filled", nargs="+", type=float, default=[0.5, 0.75, 1.0],
                        help="shares of the window written (the rest closed by the mask)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="attention-mask.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark times CUDA graphs: run it on a GPU")
    from decode import copy_bandwidth

    bandwidth = copy_bandwidth()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "window": args.window,
              "copy_bandwidth_bytes_per_s": bandwidth, "rows": []}
    print(f"{report['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    for shape in args.shapes:
        spec = QWEN3_SHAPES[shape]
        heads, kv_heads, dim = spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"]
        for rows in args.rows:
            query = torch.randn(rows, heads, 1, dim, dtype=torch.bfloat16, device="cuda")
            key, value = (torch.randn(rows, kv_heads, args.window, dim, dtype=torch.bfloat16, device="cuda")
                          for _ in range(2))
            for share in args.filled:
                filled = max(1, int(args.window * share))
                mask = torch.zeros(rows, 1, 1, args.window, dtype=torch.bool, device="cuda")
                mask[..., :filled] = True
                scale = dim ** -0.5
                gated = graph_seconds(lambda: decode_attention(query, key, value, mask, scale), args.repeats)
                ungated = graph_seconds(lambda: decode_attention(query, key, value, mask, scale, gated=False),
                                        args.repeats)
                exact = graph_seconds(lambda: decode_attention(query, key[:, :, :filled], value[:, :, :filled],
                                                               mask[..., :filled], scale), args.repeats)
                floor = 2 * rows * kv_heads * filled * dim * 2 / bandwidth
                same = torch.equal(decode_attention(query, key, value, mask, scale),
                                   decode_attention(query, key, value, mask, scale, gated=False))
                row = {"shape": shape, "rows": rows, "window": args.window, "filled": filled,
                       "gated_us": round(gated * 1e6, 2), "ungated_us": round(ungated * 1e6, 2),
                       "exact_us": round(exact * 1e6, 2), "floor_us": round(floor * 1e6, 2),
                       "ungated_over_gated": round(ungated / gated, 3), "gated_over_exact": round(gated / exact, 3),
                       "gated_over_floor": round(gated / floor, 3), "same_output": same}
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
            del query, key, value
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
