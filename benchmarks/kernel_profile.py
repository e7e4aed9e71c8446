"""The fused 2-bit kernel's calls of one Qwen3 decoder layer, a few times each, for a profiler to read (no
timing of its own): the grouped gate+up call and down_proj at 1 and 16 rows, random 2-bit buffers at group 128.

    ncu --clock-control none --kernel-name regex:_gptq2_matmul_kernel --launch-count 8 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis \
        python3 benchmarks/kernel_profile.py --shape qwen3-8b > kernel-profile.txt

Each (call, rows) runs `--calls` times, the first of which also compiles the kernel, in the order printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_plans import GROUP, layer_calls  # noqa: E402

from inference.decoding import kernels  # noqa: E402
from inference.decoding.shapes import QWEN3_SHAPES  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-8b", choices=list(QWEN3_SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--names", nargs="+", default=["gate_up grouped", "down_proj"])
    parser.add_argument("--calls", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = layer_calls(QWEN3_SHAPES[args.shape])
    generator = torch.Generator(device).manual_seed(0)
    for name in args.names:
        K, N = calls[name]
        qweight = torch.randint(-2**31, 2**31 - 1, (K // 16, N), dtype=torch.int32, device=device, generator=generator)
        qzeros = torch.randint(-2**31, 2**31 - 1, (K // GROUP, N // 16), dtype=torch.int32, device=device,
                               generator=generator)
        scales = (torch.rand(K // GROUP, N, device=device, generator=generator) * 0.01).to(torch.bfloat16)
        for rows in args.rows:
            x = torch.randn(rows, K, device=device, generator=generator).to(torch.bfloat16)
            plan = kernels.launch_plan(rows, K, N, GROUP)
            print(f"{name} K={K} N={N} rows={rows} plan={plan}", flush=True)
            for _ in range(args.calls):
                kernels.gptq2_matmul(x, qweight, qzeros, scales, GROUP)
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
