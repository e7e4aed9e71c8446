"""Benchmark: decode latency at real Qwen3 shapes against the memory-bandwidth floor (one GPU call).

For each public shape (random weights built from its config, no download) and each precision:
- `bf16`, and 2-bit GPTQ (group 128, random packed weights) through each kernel: `fused` (ours,
  `inference/decoding/kernels.py`: dequantizes inside the matmul), `gptq-triton` and `gptq-torch` (GPTQModel's
  2-bit backends, which dequantize the whole weight every call, then multiply);
- per decode step at batch 1 and 16 and context 1k and 8k: the step captured in a CUDA graph over a
  static KV cache (`inference/decoding/steps.py`), replayed back to back; the floor is the bytes the step must
  read (`inference/decoding/shapes.py`: weights + KV cache) over the copy bandwidth measured here first.
Also, once per shape: the eager HF step (dynamic cache) with a profile of why it is slow (kernels per
step, GPU busy time against wall time), the `generate` loop's cost per token on both paths, the
probe's overhead inside the 2-bit step, tokens per second of collection with and without capture, and
a check that the static path chooses the dynamic path's greedy tokens on the embedded model.

    python benchmarks/decode.py --shapes qwen3-0.6b qwen3-8b --out decode.json

Prints a markdown table and writes JSON (the README shows the latest table with its machine). Without
GPTQModel installed, only the fused kernel runs, over 2-bit buffers built directly in GPTQModel's layout.
Where one step's time goes, part by part, and GemLite's A16W2 beside the fused kernel:
`benchmarks/decode_step.py`.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch
from transformers import Qwen3ForCausalLM

from inference.decoding.generate import Sampler, generate
from inference.decoding.shapes import QWEN3_SHAPES, decode_step_bytes, qwen3_config
from inference.decoding.steps import StaticSteps


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(gib: float = 2.0, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), best of `repeats`."""
    source = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 2):
        sync()
        began = time.perf_counter()
        target.copy_(source)
        sync()
        best = min(best, time.perf_counter() - began)
    del source, target
    return 2 * gib * 2**30 / best


def build_bf16(shape: str, **overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = qwen3_config(shape, attn_implementation="sdpa", **overrides)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def quantize_randomly(model, backend: str, group_size: int = 128, device: str | torch.device = "cuda") -> int:
    """Swap every decoder-layer nn.Linear for a 2-bit GPTQModel module with random packed weights and scales
    in the layer's dtype (timing only). `backend`: gptq-torch (TorchLinear) or gptq-triton (TritonV2Linear)."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.nn_modules.qlinear.tritonv2 import TritonV2Linear

    kind = {"gptq-torch": TorchLinear, "gptq-triton": TritonV2Linear}[backend]
    # GPTQModel wraps dequantization in torch.compile on post_init; its compile time is not decoding time.
    kind.optimize = lambda self, *args, **kwargs: None
    swapped = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                k, n = child.in_features, child.out_features
                with torch.device(device):
                    module = kind(bits=2, group_size=group_size, sym=True, desc_act=False, in_features=k,
                                  out_features=n, bias=False)
                module.qweight.random_(-(2**31), 2**31 - 1)
                module.qzeros.random_(-(2**31), 2**31 - 1)
                module.scales = torch.rand(module.scales.shape, device=device).mul(0.02).to(child.weight.dtype)
                module.g_idx.copy_(torch.arange(k, device=device, dtype=module.g_idx.dtype) // group_size)
                module.post_init()
                setattr(parent, name, module)
                swapped += 1
        torch.cuda.empty_cache()
    return swapped


def set_backend(model, backend: str) -> None:
    """Run the 2-bit modules through `backend` (same packed buffers)."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.nn_modules.qlinear.tritonv2 import TritonV2Linear

    from inference.decoding.kernels import Fused2BitLinear, fuse_2bit_linears

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, Fused2BitLinear):
                    setattr(parent, name, child.gptq)
    if backend == "fused":
        fuse_2bit_linears(model)
        return
    kind = {"gptq-torch": TorchLinear, "gptq-triton": TritonV2Linear}[backend]
    for module in model.modules():
        if isinstance(module, TorchLinear):
            module.__class__ = kind


class InGraphProbe(torch.nn.Module):
    """What the learned trigger computes per step, as tensors only (so it can live in the graph):
    standardise the watched layers' states, update a running mean over the last `window` states and
    score both with the probe (an MLP of the detector's default size)."""

    def __init__(self, layers, hidden: int, batch: int, window: int = 8, width: int = 64):
        super().__init__()
        from detector.probe import Probe

        self.layers = list(layers)
        size = len(self.layers) * hidden
        self.register_buffer("mean", torch.zeros(size, device="cuda"))
        self.register_buffer("std", torch.ones(size, device="cuda"))
        self.register_buffer("ring", torch.zeros(window, batch, size, device="cuda"))
        self.register_buffer("slot", torch.zeros((), dtype=torch.long, device="cuda"))
        self.probe = Probe(2 * size, width).to("cuda").eval()

    def forward(self, hidden: dict) -> torch.Tensor:
        states = (torch.cat([hidden[layer].float() for layer in self.layers], dim=-1) - self.mean) / self.std
        self.ring.index_copy_(0, self.slot.view(1) % self.ring.shape[0], states[None])
        self.slot.add_(1)
        return torch.sigmoid(self.probe(torch.cat([states, self.ring.mean(dim=0)], dim=-1)))


WARM_SECONDS = 0.5
"""Seconds of replays before a step is timed (`step_latency`), so that the card runs at the clocks it keeps under
load, not those of a card just back from idle."""


def step_latency(model, batch: int, context: int, steps: int, probe=None, layers=(), compile: bool = False,
                 timings: dict | None = None, max_length: int | None = None, windowed: bool = True,
                 logits: dict | None = None) -> float:
    """Seconds per decode step: graph replays over a static cache holding `context` positions (with
    `compile`, the step goes through torch.compile before capture; `timings` gets the warm-up time and the
    time of the first `steps` replays, before the card has replayed for WARM_SECONDS; on one H100, 2026-12-07, the
    compiled 2-bit Qwen3-8B step's first replays after its compile took 3.224 ms each and the warm ones 3.202 ms).
    `max_length`: the cache's size (default: just past what the steps fill); `windowed`: whether the
    step attends over only the filled part of it (`StaticSteps`). The fed tokens are the same at every
    call of one batch size; `logits` gets the last step's logits (float32, on the CPU) under "logits"."""
    from inference.decoding.generate import resolve_layers

    watched = list(layers) if probe is not None else []
    runner = StaticSteps(model, watched, resolve_layers(watched, model.config.num_hidden_layers),
                         max_length=max_length or context + steps + 8, probe=probe,
                         graph=model.device.type == "cuda", compile=compile, windowed=windowed)
    device = model.device
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(batch)).to(device)
    runner.prefill(ids, torch.ones(batch, 1, dtype=torch.long, device=device),
                   torch.zeros(batch, 1, dtype=torch.long, device=device))
    # The cache now "holds" `context` positions: attention reads them all (their values do not matter).
    for layer in runner.cache.layers:
        layer.cumulative_length.fill_(context)
    runner.mask[:, 0, 0, :context] = True
    runner.prompt = context
    positions = torch.full((batch, 1), context, dtype=torch.long, device=device)
    tokens = ids[:, 0]
    began = time.perf_counter()
    for _ in range(3):  # eager warm-up (compiles with `compile`), capture, one replay
        out = runner.step(tokens, positions)
    sync()
    if timings is not None:
        timings["warm_up_seconds"] = time.perf_counter() - began
    replay = runner._graph.replay if runner.graph else lambda: runner._run(runner._ids, runner._positions, True)

    def per_replay() -> float:
        # Each step writes the cache at its layers' running lengths, which the step (and its graph) advance:
        # back to `context` first, so that every pass of `steps` steps fits the cache however many ran before.
        for layer in runner.cache.layers:
            layer.cumulative_length.fill_(context)
        began = time.perf_counter()
        for _ in range(steps):
            replay()
        sync()
        return (time.perf_counter() - began) / steps

    first = per_replay()
    if timings is not None:
        timings["first_replays_seconds"] = first
    until = time.perf_counter() + (WARM_SECONDS if device.type == "cuda" else 0.0)
    per_replay()  # at least one warm pass on every device, so that the CPU runs the same sequence
    while time.perf_counter() < until:
        per_replay()
    seconds = per_replay()
    if logits is not None:
        logits["logits"] = out.logits.float().cpu()  # on the graph path, the tensor every replay rewrites
    del runner, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def fused_check(model) -> dict:
    """The fused kernel against GPTQModel's own forward (dequantize, then matmul) on one layer's buffers."""
    from inference.decoding.kernels import Fused2BitLinear

    linear = next(m for m in model.modules() if isinstance(m, Fused2BitLinear))
    errors = {}
    for rows in (1, 16):
        x = torch.randn(rows, linear.in_features, device="cuda", dtype=torch.bfloat16)
        ours, theirs = linear(x).float(), linear.gptq(x).float()
        errors[f"rows_{rows}_relative_error"] = float((ours - theirs).norm() / theirs.norm())
    return errors


def linear_microbench(model, calls: int = 50) -> list[dict]:
    """Per linear shape of one decoder layer: a bf16 GEMV (cuBLAS) against the fused 2-bit kernel on
    that layer's packed weights, `calls` launches captured in one CUDA graph, at 1 and 16 rows."""
    from inference.decoding.kernels import Fused2BitLinear

    results = []
    layer = model.model.layers[0]
    for name, module in [*layer.self_attn.named_children(), *layer.mlp.named_children()]:
        if not isinstance(module, Fused2BitLinear):
            continue
        dense = torch.randn(module.out_features, module.in_features, device="cuda", dtype=torch.bfloat16)
        packed = sum(t.numel() * t.element_size() for t in (module.gptq.qweight, module.gptq.qzeros,
                                                            module.gptq.scales))
        for rows in (1, 16):
            x = torch.randn(rows, module.in_features, device="cuda", dtype=torch.bfloat16)
            timing = {}
            for kind, fn, size in (("bf16", lambda: torch.nn.functional.linear(x, dense), dense.numel() * 2),
                                   ("fused", lambda: module(x), packed)):
                fn()
                sync()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(calls):
                        fn()
                graph.replay()
                sync()
                began = time.perf_counter()
                for _ in range(5):
                    graph.replay()
                sync()
                seconds = (time.perf_counter() - began) / (5 * calls)
                timing[kind] = {"us": seconds * 1e6, "GB_per_s": size / seconds / 1e9, "bytes": size}
            results.append({"linear": name, "in": module.in_features, "out": module.out_features, "rows": rows,
                            **timing})
        del dense
    return results


def probe_overhead(model, layers, hidden: int, steps: int) -> dict:
    """The step with the in-graph probe (and the watched layers' states it reads) against without."""
    base = min(step_latency(model, 1, 1024, steps) for _ in range(2))
    probe = InGraphProbe(layers, hidden, 1)
    watched = min(step_latency(model, 1, 1024, steps, probe=probe, layers=layers) for _ in range(2))
    return {"step_seconds": base, "with_probe_seconds": watched, "overhead": watched / base - 1}


def loop_costs(model, batch: int, prompt: int, steps: int) -> dict:
    """Per generated token through `generate` (sampling, bookkeeping, one host sync per step), dynamic
    and static, and per prefilled token."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    mask = torch.ones_like(ids)
    result = {}
    for decode in ("dynamic", "static"):
        times = {}
        for new in (1, steps + 1):
            best = float("inf")
            for _ in range(2):
                sync()
                began = time.perf_counter()
                generate(model, ids, mask, max_new_tokens=new, eos_token_ids=[], pad_token_id=0, sampler=Sampler(),
                         decode=decode)
                sync()
                best = min(best, time.perf_counter() - began)
            times[new] = best
        result[decode] = (times[steps + 1] - times[1]) / steps
        result["prefill_per_token"] = times[1] / (batch * prompt)
    return result


def profile_eager(model, batch: int, context: int, steps: int = 8) -> dict:
    """Why the eager step is slow: kernels launched and GPU busy time per step against wall time."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    mask = torch.ones_like(ids)
    generate(model, ids, mask, max_new_tokens=steps + 1, eos_token_ids=[], pad_token_id=0)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(model, ids, mask, max_new_tokens=steps + 1, eos_token_ids=[], pad_token_id=0)
        sync()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6  # microseconds -> seconds
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:15]
    breakdown = [{"kernel": name, "per_step": len(times) / (steps + 1), "us_per_step": sum(times) / (steps + 1),
                  "mean_us": sum(times) / len(times)} for name, times in top]
    began = time.perf_counter()
    generate(model, ids, mask, max_new_tokens=steps + 1, eos_token_ids=[], pad_token_id=0)
    sync()
    wall = time.perf_counter() - began
    # The prefill is included in both; report per step of the whole call (prefill is one of steps + 1 forwards).
    short = sum(1 for e in kernels if e.time_range.elapsed_us() < 5) / (steps + 1)
    return {"kernels_per_step": len(kernels) / (steps + 1), "kernels_under_5us_per_step": short,
            "gpu_busy_per_step": busy / (steps + 1), "wall_per_step": wall / (steps + 1), "top_kernels": breakdown}


def collection_rate(model, layers, batch: int, steps: int) -> dict:
    """Tokens per second of `generate` with the collection hook (states of `layers` + top-token
    probability kept every step) and without, on the static path, sampling as collection does."""
    from training.collect import HiddenRecorder

    ids = torch.randint(0, model.config.vocab_size, (batch, 64), device="cuda")
    mask = torch.ones_like(ids)
    rates = {}
    for variant in ("plain", "capture", "plain", "capture"):
        recorder = HiddenRecorder(layers, batch, steps, torch.float16) if variant == "capture" else None
        generator = torch.Generator(device="cuda").manual_seed(0)
        sync()
        began = time.perf_counter()
        generate(model, ids, mask, max_new_tokens=steps, eos_token_ids=[], pad_token_id=0,
                 sampler=Sampler(0.6, 20, 0.95), generator=generator, layers=layers, hook=recorder,
                 top_prob=recorder is not None, stack_dtype=torch.float16 if recorder else None, decode="static")
        sync()
        rates[variant] = batch * steps / (time.perf_counter() - began)  # the second run of each is kept
    return rates


def greedy_agreement(steps: int = 64, decodes=("dynamic", "static")) -> dict:
    """Static (graph) and dynamic paths on the embedded tiny-s model, greedy, a left-padded batch."""
    from inference.config import load_config
    from inference.decoding.models import load_full_precision
    from inference.prompts import render_prompt
    from training.arith import arith_problems

    result = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_full_precision(load_config("tiny-s").model.fp16, dtype, "cuda")
        prompts = [render_prompt(tokenizer, p.question) for p in arith_problems("test", limit=16)]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to("cuda")
        runs = {decode: generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=steps,
                                 eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                                 decode=decode).generated_ids for decode in decodes}
        result[dtype] = {"sequences": len(runs["dynamic"]),
                         **{f"identical_{d}": sum(a == b for a, b in zip(runs["dynamic"], runs[d]))
                            for d in decodes[1:]}}
    return result


def guarded(record: dict, key: str, work):
    """Run one measurement; a failure is recorded (and printed) instead of ending the run."""
    try:
        record[key] = work()
    except Exception as error:  # noqa: BLE001 - a benchmark reports every failure and goes on
        record[key] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        torch.cuda.empty_cache()
    print(key, record[key], flush=True)
    return record[key]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["qwen3-0.6b", "qwen3-8b"], choices=list(QWEN3_SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192])
    parser.add_argument("--backends", nargs="+", default=["fused", "gptq-triton", "gptq-torch"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--compiled", nargs="*", default=["1x1024"], metavar="BATCHxCONTEXT",
                        help="points also measured with the step through torch.compile (bf16 and fused)")
    parser.add_argument("--skip", nargs="*", default=[], help="sections to leave out: eager, loops, collection, micro")
    parser.add_argument("--out", default="decode.json")
    args = parser.parse_args()

    bandwidth = copy_bandwidth()
    import transformers

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "copy_bandwidth_bytes_per_s": bandwidth, "rows": [], "shapes": {}}
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    decodes = ("dynamic", "static", "compiled") if args.compiled else ("dynamic", "static")
    compiled_points = [tuple(int(v) for v in point.split("x")) for point in args.compiled]

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)

    standalone = None  # without GPTQModel, 2-bit linears built directly in its layout (decode_step.py)
    try:
        import gptqmodel  # noqa: F401
    except ImportError:
        from decode_step import quantize_standalone as standalone

    for shape in args.shapes:
        spec = QWEN3_SHAPES[shape]
        layers = [spec["num_hidden_layers"] // 2, 3 * spec["num_hidden_layers"] // 4, spec["num_hidden_layers"] - 1]
        model = build_bf16(shape)
        info = report["shapes"][shape] = {"layers_watched": layers}
        if "eager" not in args.skip:
            guarded(info, "eager_profile_b1_1k", lambda: profile_eager(model, 1, 1024))
        if "loops" not in args.skip:
            guarded(info, "loop_b1_1k_bf16", lambda: loop_costs(model, 1, 1024, 32))
        precisions = [("bf16", None)] + [("2bit", backend) for backend in args.backends]
        for precision, backend in precisions:
            if precision == "2bit":
                if backend == precisions[1][1]:
                    info["quantized_linears"] = (quantize_randomly(model, "gptq-triton") if standalone is None
                                                 else standalone(model))
                    gc.collect()
                    torch.cuda.empty_cache()
                if standalone is not None:  # the fused kernel only: it reads the buffers, not GPTQModel's modules
                    if "error" in guarded(info, f"backend_{backend}", lambda: "ok" if backend == "fused" else
                                          {"error": "GPTQModel is not installed"}):
                        continue
                elif "error" in guarded(info, f"backend_{backend}", lambda: set_backend(model, backend) or "ok"):
                    continue
            bits = 16 if precision == "bf16" else 2
            points = [(batch, context, False) for batch in args.batches for context in args.contexts]
            if backend in (None, "fused"):
                points += [(batch, context, True) for batch, context in compiled_points]
            for batch, context, compiled in points:
                if backend not in (None, "fused") and (batch, context) != (1, 1024):
                    continue  # the dequantizing backends: one point is enough to rank them
                floor_bytes = decode_step_bytes(spec, bits, 128, batch, context)["total"]
                error, timings = None, {}
                try:
                    seconds = step_latency(model, batch, context, args.steps, compile=compiled, timings=timings)
                except Exception as failure:  # noqa: BLE001 - out of memory included: recorded, not fatal
                    seconds, error = None, f"{type(failure).__name__}: {str(failure).splitlines()[0]}"
                    torch.cuda.empty_cache()
                row = {"shape": shape, "precision": precision,
                       "kernel": (backend or "cuBLAS") + (" + compile" if compiled else ""), "batch": batch,
                       "context": context, "step_seconds": seconds, "floor_seconds": floor_bytes / bandwidth,
                       "bytes_per_step": floor_bytes, "error": error, **timings}
                report["rows"].append(row)
                print(row, flush=True)
                save()
            if precision == "2bit" and backend == "fused":
                guarded(info, "fused_check", lambda: fused_check(model))
                if "micro" not in args.skip:
                    guarded(info, "linears_layer0", lambda: linear_microbench(model))
                guarded(info, "probe_b1_1k", lambda: probe_overhead(model, layers, spec["hidden_size"], args.steps))
                if "collection" not in args.skip:
                    guarded(info, "collection_b16", lambda: collection_rate(model, layers, 16, 128))
                if "loops" not in args.skip:
                    guarded(info, "loop_b1_1k_2bit_fused", lambda: loop_costs(model, 1, 1024, 32))
                save()
            elif precision == "bf16":
                guarded(info, "probe_b1_1k_bf16", lambda: probe_overhead(model, layers, spec["hidden_size"],
                                                                         args.steps))
                save()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    guarded(report, "greedy_agreement", lambda: greedy_agreement(decodes=decodes))
    save()
    print(table(report))


def table(report: dict) -> str:
    lines = [f"{report['device']}, copy bandwidth {report['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s",
             "", "| shape | precision | kernel | batch | context | ms / step | floor ms | x floor | ms / token |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        if r["step_seconds"] is None:
            lines.append(f"| {r['shape']} | {r['precision']} | {r['kernel']} | {r['batch']} | {r['context']} "
                         f"| {r.get('error') or 'failed'} | {r['floor_seconds'] * 1e3:.2f} | - | - |")
            continue
        lines.append(f"| {r['shape']} | {r['precision']} | {r['kernel']} | {r['batch']} | {r['context']} "
                     f"| {r['step_seconds'] * 1e3:.2f} | {r['floor_seconds'] * 1e3:.2f} "
                     f"| {r['step_seconds'] / r['floor_seconds']:.2f} | {r['step_seconds'] * 1e3 / r['batch']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
