"""Benchmark: a 2-bit prefill against bf16's, through GPTQModel's dequantization and the project's.

A prompt longer than `kernels.MAX_DECODE_ROWS` tokens does not go through the fused kernel: each 2-bit
linear dequantizes its whole weight and multiplies (`kernels.PREFILL`). `gptqmodel` is the GPTQ module's
own forward (GPTQModel's Triton dequantization kernel, then a matmul); `dequantize` is
`kernels.gptq2_dequantize` (one read of the packed buffers, one write of W), then the same matmul. The
controller's rounds prefill the 2-bit model after every rewrite and handback, so this cost enters the
end-to-end projection (`benchmarks/project_comparison.py --prefill`).

In one process, on one shape (random weights, group 128, GPTQModel's TorchLinear modules as `rescue`
loads them, wrapped by `Fused2BitLinear`):
- the whole model's prefill (batch 1, `--prompts` tokens, no cache, last position's logits), eager as
  the controller runs it: bf16, then the 2-bit twin through each prefill path, side by side;
- each dequantization alone over every layer's seven weights in turn, against its floor (packed bytes
  read plus the 16-bit weight written, over the measured copy rate).

    python3 benchmarks/prefill.py --shape qwen3-8b --prompts 256 1024 --out prefill-8b.json

On a CPU (`TRITON_INTERPRET=1`, a shape shrunk with `--override`) it runs as a smoke test of itself.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import build_bf16, copy_bandwidth, quantize_randomly, sync  # noqa: E402
from decode_step import build_bf16_cpu  # noqa: E402

from inference.decoding import kernels  # noqa: E402
from inference.decoding.shapes import QWEN3_SHAPES  # noqa: E402

CUDA = torch.cuda.is_available()
GROUP = 128


def best_seconds(work, repeats: int = 3) -> float:
    """Best wall time of `repeats` runs of `work` after one warm-up run (compiles, autotunes)."""
    work()
    sync()
    best = float("inf")
    for _ in range(repeats):
        sync()
        began = time.perf_counter()
        work()
        sync()
        best = min(best, time.perf_counter() - began)
    return best


def quantize_and_fuse(model, device: torch.device) -> int:
    """Every decoder-layer nn.Linear becomes a 2-bit GPTQModel TorchLinear with random packed weights (as
    `load_quantized` loads a checkpoint for the fused kernel), wrapped in a Fused2BitLinear."""
    swapped = quantize_randomly(model, "gptq-torch", GROUP, device)
    kernels.fuse_2bit_linears(model)
    return swapped


def prefill_seconds(model, tokens: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=model.device)
    return best_seconds(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1))


def dequantize_seconds(model, path: str) -> dict:
    """Seconds per layer of dequantizing its seven weights, every layer in turn, and the floor."""
    from gptqmodel.nn_modules.triton_utils.dequant import dequant as gptqmodel_dequant

    modules = [m.gptq for m in model.modules() if isinstance(m, kernels.Fused2BitLinear)]

    def one(module):
        if path == "gptqmodel":
            return gptqmodel_dequant(module.scales.dtype, module.qweight, module.scales, module.qzeros, module.g_idx,
                                     module.bits, module.pack_dtype_bits, module.maxq)
        return kernels.gptq2_dequantize(module.qweight, module.qzeros, module.scales, module.group_size)

    seconds = best_seconds(lambda: [one(m) for m in modules])
    moved = sum(m.qweight.numel() * 4 + m.qzeros.numel() * 4 + m.scales.numel() * 2
                + m.in_features * m.out_features * 2 for m in modules)
    return {"seconds_per_layer": seconds / model.config.num_hidden_layers,
            "bytes_per_layer": moved / model.config.num_hidden_layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-8b", choices=list(QWEN3_SHAPES))
    parser.add_argument("--prompts", nargs="+", type=int, default=[256, 1024], help="prompt lengths in tokens")
    parser.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="shape fields to change, e.g. num_hidden_layers=1 (a CPU smoke run)")
    parser.add_argument("--out", default="prefill.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    overrides = {field: int(value) for field, value in (item.split("=") for item in args.override)}
    device = torch.device("cuda" if CUDA else "cpu")
    bandwidth = copy_bandwidth() if CUDA else 1e11
    report = {"device": torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
              "torch": torch.__version__, "python": platform.python_version(), "shape": args.shape,
              "overrides": overrides, "copy_bandwidth_bytes_per_s": bandwidth, "max_decode_rows": kernels.MAX_DECODE_ROWS,
              "prefill": {}, "dequantize": {}}
    print(f"{report['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)

    def save():
        Path(args.out).write_text(json.dumps(report, indent=2))

    model = build_bf16(args.shape, **overrides) if CUDA else build_bf16_cpu(args.shape, **overrides)
    for tokens in args.prompts:
        seconds = prefill_seconds(model, tokens)
        report["prefill"][f"bf16_{tokens}"] = {"precision": "bf16", "path": "cuBLAS", "tokens": tokens,
                                               "seconds": seconds, "per_token": seconds / tokens}
        print("prefill", report["prefill"][f"bf16_{tokens}"], flush=True)
        save()
    report["quantized_linears"] = quantize_and_fuse(model, device)
    ids = torch.randint(0, model.config.vocab_size, (1, max(args.prompts)), device=device)
    logits = {}
    for path in kernels.PREFILL_PATHS:
        kernels.PREFILL = path
        logits[path] = model(input_ids=ids, use_cache=False).logits.float()
        for tokens in args.prompts:
            seconds = prefill_seconds(model, tokens)
            report["prefill"][f"2bit_{path}_{tokens}"] = {"precision": "2bit", "path": path, "tokens": tokens,
                                                          "seconds": seconds, "per_token": seconds / tokens}
            print("prefill", report["prefill"][f"2bit_{path}_{tokens}"], flush=True)
            save()
        if path == "gptqmodel" and not CUDA:
            continue  # GPTQModel's Triton dequantization launches on CUDA only
        timing = dequantize_seconds(model, path)
        timing["floor_seconds_per_layer"] = timing["bytes_per_layer"] / bandwidth
        report["dequantize"][path] = timing
        print("dequantize", path, timing, flush=True)
        save()
    first, second = (logits[path] for path in kernels.PREFILL_PATHS)
    report["logits_relative_difference"] = float((first - second).norm() / first.norm())
    save()
    print("relative difference of the two paths' logits", report["logits_relative_difference"])
    print(tables(report))


def tables(report: dict) -> str:
    lines = ["| prefill | tokens | ms | ms / token | x bf16 |", "| --- | ---: | ---: | ---: | ---: |"]
    prefill = report["prefill"]
    for entry in prefill.values():
        bf16 = prefill.get(f"bf16_{entry['tokens']}")
        ratio = f"{entry['seconds'] / bf16['seconds']:.2f}x" if bf16 else "-"
        label = "bf16" if entry["precision"] == "bf16" else f"2-bit, {entry['path']}"
        lines.append(f"| {label} | {entry['tokens']} | {entry['seconds'] * 1e3:.2f} | {entry['per_token'] * 1e3:.4f} "
                     f"| {ratio} |")
    lines += ["", "| dequantization of a layer's seven weights | us | floor us | x floor |", "| --- | ---: | ---: | ---: |"]
    for path, timing in report["dequantize"].items():
        lines.append(f"| {path} | {timing['seconds_per_layer'] * 1e6:.1f} | {timing['floor_seconds_per_layer'] * 1e6:.1f} "
                     f"| {timing['seconds_per_layer'] / timing['floor_seconds_per_layer']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
