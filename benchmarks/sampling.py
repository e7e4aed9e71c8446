"""Benchmark: one sampled token per row over a Qwen3 vocabulary (151,936), transformers' warpers over the
whole vocabulary against `Sampler`'s candidate path (top-p and the draw on the top_k + margin highest
scores), side by side in one process, at the sampling Qwen3 recommends for thinking (temperature 0.6,
top-k 20, top-p 0.95); then `Sampler.draw` alone as the static decode step runs it, captured in a CUDA graph
(eagerly on a CPU): the draw's own time, without launches or host waits.

    python benchmarks/sampling.py --batches 1 16 64 --out sampling.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference.decoding import generate as generate_module  # noqa: E402
from inference.decoding.generate import Sampler  # noqa: E402


def seconds(work, repeats: int, cuda: bool) -> float:
    for _ in range(3):
        work()
    if cuda:
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        work()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / repeats


def in_graph(work, repeats: int, cuda: bool) -> float:
    """Seconds per run of `work` replayed from a CUDA graph (after one eager run), or eager on a CPU."""
    if not cuda:
        return seconds(work, repeats, cuda)
    work()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    return seconds(graph.replay, repeats, cuda)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="sampling.json")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sampler = Sampler(0.6, 20, 0.95)
    generator = torch.Generator(device).manual_seed(0)
    report = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)",
              "torch": torch.__version__, "python": platform.python_version(), "vocab": args.vocab, "rows": []}
    print("| batch | whole vocabulary ms | candidates ms | ratio | the step's draw in a graph ms |\n"
          "| ---: | ---: | ---: | ---: | ---: |")
    for batch in args.batches:
        logits = (torch.randn(batch, args.vocab, device=device, generator=generator) * 3).to(torch.bfloat16)
        candidates = seconds(lambda: sampler.choose(logits, generator), args.repeats, cuda)
        threshold = generate_module.CANDIDATES_FROM_VOCAB
        generate_module.CANDIDATES_FROM_VOCAB = args.vocab + 1  # the whole-vocabulary path
        try:
            whole = seconds(lambda: sampler.choose(logits, generator), args.repeats, cuda)
        finally:
            generate_module.CANDIDATES_FROM_VOCAB = threshold
        uniforms = torch.rand(batch, device=device, generator=generator)
        drawn = in_graph(lambda: sampler.draw(logits, uniforms), args.repeats, cuda)
        report["rows"].append({"batch": batch, "whole_seconds": whole, "candidates_seconds": candidates,
                               "draw_in_graph_seconds": drawn})
        print(f"| {batch} | {whole * 1e3:.3f} | {candidates * 1e3:.3f} | {whole / candidates:.1f}x | "
              f"{drawn * 1e3:.3f} |", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
