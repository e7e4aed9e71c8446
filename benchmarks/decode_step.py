"""Benchmark: where one decode step's time goes, against the floor of each part, with GemLite's A16W2
as a library baseline for the 2-bit linears (one GPU call, one shape).

In one process, for the shape's bf16 model and then its 2-bit twin (random weights, group 128):
- the graph-captured step (`inference/decoding/steps.py`) at each batch size, context 1k, over a cache just
  past what it fills, and over a long budget's cache (context + 4096) with and without the windowed
  attention of `StaticSteps`;
- a breakdown of the step: the decoder layers' linears (all of them, in order, one CUDA graph),
  attention (every layer over the same cache: the split-cache kernel, packed SDPA and HF's SDPA call;
  `inference/decoding/attention.py`), norms / rotary / KV writes /
  residuals / activation (the step's own modules), the output head, and sampling as `generate` does it
  (eagerly, after the replay); each part's floor is the bytes it must read over the copy rate;
- the linears of one decoder layer (the 36 layers' in turn, so no weight is in L2 twice) at 1, 4 and
  16 rows: bf16 cuBLAS, the fused kernel and GemLite's A16W2 (HQQ format, the same codes, scales and
  zero points), with each kernel's error against the float32 product;
- the bf16 step and the linears of a layer with q, k, v as one matmul and gate, up as another
  (`group_linear_projections`, the members' weights views of the group's);
- the fused kernel with q, k, v in one call and gate, up in one (`Grouped2BitLinear`), and each 2-bit
  linear and grouped call alone against its floor (`per_linear`), at the same row counts; last, the 2-bit
  step with its projections grouped so (`group_2bit_projections`), uncompiled and compiled, compiled once with
  the split-K sums kernel and once with the sums left to torch (`kernels.SPLIT_SUMS`), each compiled step's
  logits against the uncompiled one's;
- a token through `generate` (the step, the draw and the loop's bookkeeping) for the grouped bf16 and the
  grouped 2-bit model at each batch size, greedy and sampled, the draw in the step's graph and after it;
- the probe's overhead inside the 2-bit step, collection's tokens per second with capture and
  without, and that the windowed graphs choose the dynamic path's greedy tokens (embedded tiny-s).

    python benchmarks/decode_step.py --shape qwen3-8b --out decode-step.json

GPTQModel is optional: without it the 2-bit linears are built directly in its layout (the fused
kernel reads only the buffers). Sections run in order of importance until `--deadline` seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import InGraphProbe, build_bf16, collection_rate, copy_bandwidth, step_latency  # noqa: E402

import inference.decoding.kernels as kernels  # noqa: E402
from inference.decoding.attention import DECODE_ATTENTIONS, use_decode_attention  # noqa: E402
from inference.decoding.generate import Sampler  # noqa: E402
from inference.decoding.kernels import (  # noqa: E402
    Fused2BitLinear,
    Grouped2BitLinear,
    GroupedMember,
    group_2bit_projections,
    group_linear_projections,
    ungroup_projections,
)
from inference.decoding.shapes import QWEN3_SHAPES, decode_step_bytes, linear_shapes  # noqa: E402
from inference.decoding.steps import DynamicSteps, StaticSteps  # noqa: E402

CUDA = torch.cuda.is_available()
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(work, repeats: int = 5) -> float:
    """Seconds per run of `work`: on CUDA one run captured in a CUDA graph and replayed `repeats` times
    back to back (after one eager run, which compiles and autotunes); on a CPU, eager runs."""
    work()
    sync()
    if not CUDA:
        began = time.perf_counter()
        for _ in range(repeats):
            work()
        return (time.perf_counter() - began) / repeats
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    graph.replay()
    sync()
    began = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    sync()
    return (time.perf_counter() - began) / repeats


def eager_seconds(work, repeats: int = 20) -> float:
    """Seconds per eager run of `work` (launches included), runs back to back."""
    work()
    sync()
    began = time.perf_counter()
    for _ in range(repeats):
        work()
    sync()
    return (time.perf_counter() - began) / repeats


def unpack_2bit(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [K, N] and zero points [K / G, N] (uint8) of 2-bit GPTQ buffers (`inference/decoding/kernels.py`)."""
    shifts = 2 * torch.arange(16, device=qweight.device, dtype=torch.int32)
    codes = ((qweight[:, None, :] >> shifts[None, :, None]) & 3).reshape(-1, qweight.shape[1])
    zeros = ((qzeros[:, :, None] >> shifts[None, None, :]) & 3).reshape(qzeros.shape[0], -1)
    return codes.to(torch.uint8), zeros.to(torch.uint8)


def dequantize_2bit(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """W [K, N] in float32: (code - zero) * scale."""
    codes, zeros = unpack_2bit(qweight, qzeros)
    return ((codes.float() - zeros.float().repeat_interleave(group_size, 0))
            * scales.float().repeat_interleave(group_size, 0))


class Random2BitLinear(nn.Module):
    """Random 2-bit GPTQ buffers in GPTQModel's layout (timing only); its forward (more rows than the
    fused kernel takes: prefill) dequantizes and multiplies."""

    bits = 2

    def __init__(self, in_features: int, out_features: int, group_size: int, device):
        super().__init__()
        self.in_features, self.out_features, self.group_size, self.bias = in_features, out_features, group_size, None
        low, high = -(2**31), 2**31 - 1
        self.register_buffer("qweight", torch.randint(low, high, (in_features // 16, out_features), dtype=torch.int32,
                                                      device=device))
        self.register_buffer("qzeros", torch.randint(low, high, (in_features // group_size, out_features // 16),
                                                     dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.rand(in_features // group_size, out_features, device=device)
                             .mul(0.02).to(torch.bfloat16))

    def forward(self, x):
        weight = dequantize_2bit(self.qweight, self.qzeros, self.scales, self.group_size)
        return torch.nn.functional.linear(x, weight.t().to(x.dtype))


def quantize_standalone(model, group_size: int = 128) -> int:
    """Swap every decoder-layer nn.Linear for a Fused2BitLinear over random 2-bit buffers."""
    swapped = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    packed = Random2BitLinear(child.in_features, child.out_features, group_size, child.weight.device)
                    setattr(parent, name, Fused2BitLinear(packed))
                    swapped += 1
        if CUDA:
            torch.cuda.empty_cache()
    return swapped


def layer_linears(layer) -> list[nn.Module]:
    """The seven linears of a decoder layer, in the order the step calls them."""
    return [getattr(layer.self_attn if name in LINEAR_NAMES[:4] else layer.mlp, name) for name in LINEAR_NAMES]


def linears_seconds(layers: list[list], rows: int, dtype=torch.bfloat16) -> float:
    """Seconds per call of every linear of `layers` (lists of callables with in_features) in turn."""
    device = "cuda" if CUDA else "cpu"
    inputs = {k: torch.randn(rows, k, device=device, dtype=dtype) for k in {m.in_features for ms in layers for m in ms}}
    return timed(lambda: [m(inputs[m.in_features]) for ms in layers for m in ms])


def grouped_layer(layer) -> list[nn.Module]:
    """A layer's 2-bit linears as four kernel calls: q+k+v (one Grouped2BitLinear), o, gate+up (another),
    down."""
    q, k, v, o, gate, up, down = layer_linears(layer)
    return [Grouped2BitLinear([q, k, v]), o, Grouped2BitLinear([gate, up]), down]


def packed_bytes(module) -> int:
    """Bytes a 2-bit linear's kernel call must read: packed codes, zero points and scales."""
    buffers = module.gptq if isinstance(module, Fused2BitLinear) else module
    return sum(t.numel() * t.element_size() for t in (buffers.qweight, buffers.qzeros, buffers.scales))


def per_linear_seconds(linears: list[list], grouped: list[list], rows_list, dtype, bandwidth: float) -> dict:
    """Microseconds per layer of each 2-bit linear alone and of each grouped call (every layer's in turn,
    one CUDA graph), with its floor: where a layer's linear time goes at each row count."""
    result = {}
    named = [(name, [layer[index] for layer in linears]) for index, name in enumerate(LINEAR_NAMES)]
    named += [(name, [layer[index] for layer in grouped])
              for index, name in ((0, "qkv grouped"), (2, "gate_up grouped"))]
    for name, modules in named:
        floor = packed_bytes(modules[0]) / bandwidth
        result[name] = {"floor_us": floor * 1e6}
        for rows in rows_list:
            seconds = linears_seconds([[m] for m in modules], rows, dtype) / len(modules)
            result[name][f"rows_{rows}_us"] = seconds * 1e6
        print("per linear", name, result[name], flush=True)
    return result


class GemLiteA16W2(nn.Module):
    """GemLite's A16W2 linear built from a Fused2BitLinear's codes, zero points and scales (HQQ format:
    W = (W_q - zeros) * scales)."""

    def __init__(self, fused: Fused2BitLinear):
        super().__init__()
        from gemlite import DType, GemLiteLinear

        gptq = fused.gptq
        codes, zeros = unpack_2bit(gptq.qweight, gptq.qzeros)
        self.in_features, self.out_features = fused.in_features, fused.out_features
        self.linear = GemLiteLinear(2, group_size=gptq.group_size, in_features=self.in_features,
                                    out_features=self.out_features, input_dtype=DType.BF16, output_dtype=DType.BF16)
        self.linear.pack(codes.t().contiguous(), gptq.scales.t().contiguous().to(torch.bfloat16),
                         zeros.t().contiguous().to(torch.bfloat16), bias=None)

    def forward(self, x):
        return self.linear(x)


def relative_errors(layer, kernels: dict, rows_list=(1, 16)) -> dict:
    """Each kernel's relative error against the float32 product with the dequantized weight, mean over a
    layer's linears (`kernels`: name -> the layer's seven callables in LINEAR_NAMES order)."""
    device = "cuda" if CUDA else "cpu"
    errors = {name: {} for name in kernels}
    for rows in rows_list:
        sums = {name: 0.0 for name in kernels}
        for index, fused in enumerate(layer_linears(layer)):
            gptq = fused.gptq
            weight = dequantize_2bit(gptq.qweight, gptq.qzeros, gptq.scales, gptq.group_size)
            x = torch.randn(rows, fused.in_features, device=device, dtype=torch.bfloat16)
            reference = x.float() @ weight
            for name, modules in kernels.items():
                sums[name] += float((modules[index](x).float() - reference).norm() / reference.norm())
        for name in kernels:
            errors[name][f"rows_{rows}"] = sums[name] / len(LINEAR_NAMES)
    return errors


def step_parts(model, batch: int, context: int, steps: int) -> dict:
    """Seconds of each part of one decode step at `batch` rows over a cache filled to `context` of
    `context + steps + 8` positions (as `step_latency`'s): linears, attention, elementwise, head, and
    sampling as `generate` runs it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    from inference.decoding.attention import decode_attention, grouped_attention

    config, device, dtype = model.config, model.device, model.dtype
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    hidden, length = config.hidden_size, context + steps + 8
    layers = list(model.model.layers)
    parts = {"linears": linears_seconds([layer_linears(layer) for layer in layers], batch, dtype)}

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    keys = [randn(batch, kv_heads, length, head_dim) for _ in layers]
    values = [randn(batch, kv_heads, length, head_dim) for _ in layers]
    mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=device)
    mask[..., :context + 1] = True
    query = randn(batch, heads, 1, head_dim)
    parts["attention"] = timed(lambda: [decode_attention(query, k, v, mask, layer.self_attn.scaling)
                                        for layer, k, v in zip(layers, keys, values)])
    parts["attention_grouped"] = timed(lambda: [grouped_attention(layer.self_attn, query, k, v, mask, dropout=0.0,
                                                                  scaling=layer.self_attn.scaling)
                                                for layer, k, v in zip(layers, keys, values)])
    parts["attention_hf"] = timed(lambda: [sdpa_attention_forward(layer.self_attn, query, k, v, mask, dropout=0.0,
                                                                  scaling=layer.self_attn.scaling)
                                           for layer, k, v in zip(layers, keys, values)])
    # The kernel's largest difference from packed SDPA over the first layer, relative to the largest output.
    kernel = decode_attention(query, keys[0], values[0], mask, layers[0].self_attn.scaling).float()
    sdpa = grouped_attention(layers[0].self_attn, query, keys[0], values[0], mask, scaling=layers[0].self_attn.scaling)[0]
    parts_error = float((kernel - sdpa.float()).abs().max() / sdpa.float().abs().max())
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    positions = torch.full((batch, 1), context, dtype=torch.long, device=device)
    slot = torch.tensor([context], device=device)
    states, q, k, v = randn(batch, 1, hidden), randn(batch, 1, heads * head_dim), randn(batch, 1, kv_heads * head_dim), \
        randn(batch, 1, kv_heads * head_dim)
    gate, up = randn(batch, 1, config.intermediate_size), randn(batch, 1, config.intermediate_size)

    def elementwise():
        embedded = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary_emb(embedded, positions)
        out = states
        for layer, layer_keys, layer_values in zip(layers, keys, values):
            normed = layer.input_layernorm(out)
            qs = layer.self_attn.q_norm(q.view(batch, 1, heads, head_dim)).transpose(1, 2)
            ks = layer.self_attn.k_norm(k.view(batch, 1, kv_heads, head_dim)).transpose(1, 2)
            qs, ks = apply_rotary_pos_emb(qs, ks, cos, sin)
            layer_keys.index_copy_(2, slot, ks)
            layer_values.index_copy_(2, slot, v.view(batch, 1, kv_heads, head_dim).transpose(1, 2))
            residual = out + normed  # stands in for + o_proj's output (same size)
            normed = layer.post_attention_layernorm(residual)
            layer.mlp.act_fn(gate) * up  # what down_proj reads
            out = residual + normed  # stands in for + down_proj's output
        return model.model.norm(out)

    parts["norms_rotary_elementwise"] = timed(elementwise)
    parts["head"] = timed(lambda: model.lm_head(states))
    logits = randn(batch, config.vocab_size)
    greedy, sampler = Sampler(), Sampler(0.6, 20, 0.95)
    generator = torch.Generator(device=device).manual_seed(0)
    parts["sampling_greedy"] = eager_seconds(lambda: greedy.choose(logits, None))
    parts["sampling_t0.6_k20_p0.95"] = eager_seconds(lambda: sampler.choose(logits, generator))
    del keys, values
    return parts, parts_error


def part_floors(spec: dict, bits: int, batch: int, context: int, bandwidth: float) -> dict:
    """Each part's floor in seconds: the bytes it must read over the copy rate."""
    size = decode_step_bytes(spec, bits, 128, batch, context)
    activations = batch * spec["num_hidden_layers"] * 2 * spec["num_key_value_heads"] * spec["head_dim"] * 2
    logits = batch * spec["vocab_size"] * 2
    return {"linears": size["linears"] / bandwidth, "attention": size["kv_cache"] / bandwidth,
            "attention_grouped": size["kv_cache"] / bandwidth, "attention_hf": size["kv_cache"] / bandwidth,
            "norms_rotary_elementwise": (size["norms"] + activations) / bandwidth, "head": size["head"] / bandwidth,
            "sampling_greedy": logits / bandwidth, "sampling_t0.6_k20_p0.95": logits / bandwidth,
            "step": size["total"] / bandwidth}


def breakdown(model, spec: dict, bits: int, batch: int, context: int, steps: int, bandwidth: float) -> dict:
    """The graph step and its parts at one point, each with its floor; `unaccounted` is the step less
    the parts inside the graph (launch gaps within the graph, copies, masks, what the parts miss)."""
    step = step_latency(model, batch, context, steps)
    parts, attention_error = step_parts(model, batch, context, steps)
    floors = part_floors(spec, bits, batch, context, bandwidth)
    inside = ("linears", "attention", "norms_rotary_elementwise", "head")
    result = {"step": {"seconds": step, "floor_seconds": floors["step"]}}
    for name, seconds in parts.items():
        result[name] = {"seconds": seconds, "floor_seconds": floors[name]}
    result["unaccounted"] = {"seconds": step - sum(parts[name] for name in inside), "floor_seconds": 0.0}
    result["attention_kernel_vs_sdpa_max_error"] = attention_error
    return result


def loop_seconds(model, batch: int, context: int, decode: str, sampler: Sampler, draw_in_step: bool,
                 tokens: tuple[int, int] = (16, 112), repeats: int = 2, counts: dict | None = None) -> float:
    """Seconds per generated token through `generate` (the step, the draw, the loop's bookkeeping and its host
    syncs) on a `decode` path, after a prompt of `context` random tokens: the difference between two runs of
    `tokens` new tokens each (best of `repeats`), so that the prefill, the eager first step and the capture,
    which both runs pay once, drop out. `draw_in_step`: `generate.DRAW_IN_STEP`. `counts` gets the share of the
    last timed run's tokens (one of the longer runs) drawn by `Sampler.choose` after the step (`choose_share`):
    with the draw in the step, the draws redone because a tie with the k-th score ran past the candidates."""
    from inference.decoding import generate as generate_module

    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(7))
    ids, mask = ids.to(model.device), torch.ones(batch, context, dtype=torch.long, device=model.device)
    kept, choose = generate_module.DRAW_IN_STEP, Sampler.choose
    calls = [0]

    def counted(self, logits, generator):
        calls[0] += 1
        return choose(self, logits, generator)

    generate_module.DRAW_IN_STEP, Sampler.choose = draw_in_step, counted  # restored below
    try:
        best = {}
        for new in tokens:
            for _ in range(repeats):
                generator = torch.Generator(model.device).manual_seed(0)
                calls[0] = 0
                sync()
                began = time.perf_counter()
                generate_module.generate(model, ids, mask, max_new_tokens=new + 1, eos_token_ids=[], pad_token_id=0,
                                         sampler=sampler, generator=generator, decode=decode)
                sync()
                best[new] = min(best.get(new, float("inf")), time.perf_counter() - began)
    finally:
        generate_module.DRAW_IN_STEP, Sampler.choose = kept, choose
    if counts is not None:
        counts["choose_share"] = calls[0] / (tokens[-1] + 1)
    return (best[tokens[1]] - best[tokens[0]]) / (tokens[1] - tokens[0])


def loop_costs(model, batches, context: int, compiled_batches) -> dict:
    """Per token through `generate` at each batch size (compiled where that batch's step was compiled in this
    process, so that no new compile is timed): greedy, and sampled at Qwen3's thinking-mode settings with the
    draw in the step and after it."""
    result = {}
    for batch in batches:
        decode = "compiled" if batch in compiled_batches else "static"
        row = {"decode": decode}
        for name, sampler, in_step in (("greedy", Sampler(), True), ("sampled_in_step", Sampler(0.6, 20, 0.95), True),
                                       ("sampled_after_step", Sampler(0.6, 20, 0.95), False)):
            counts = {}
            row[name] = loop_seconds(model, batch, context, decode, sampler, in_step, counts=counts)
            row[f"{name}_choose_share"] = counts["choose_share"]
            print("loop", batch, name, f"{row[name] * 1e3:.3f} ms a token, {counts['choose_share']:.0%} of the tokens "
                  "drawn by Sampler.choose", flush=True)
        result[batch] = row
    return result


def windowed_agreement(steps: int = 160, min_window: int = 16) -> dict:
    """Greedy tokens of windowed graph steps (a small `min_window`, so the window grows and the graph is
    captured again as it grows past the prompt) against the dynamic path, embedded tiny-s, a left-padded batch."""
    from inference.config import load_config
    from inference.decoding.models import load_full_precision
    from inference.prompts import render_prompt
    from training.arith import arith_problems

    device = "cuda" if CUDA else "cpu"
    model, tokenizer = load_full_precision(load_config("tiny-s").model.fp16, "float32", device)
    prompts = [render_prompt(tokenizer, p.question) for p in arith_problems("test", limit=16)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    runs = {}
    for name in ("dynamic", "windowed"):
        if name == "dynamic":
            stepper = DynamicSteps(model, [], [])
        else:
            stepper = StaticSteps(model, [], [], max_length=enc.input_ids.shape[1] + steps + 8, graph=CUDA,
                                  min_window=min_window)
        positions = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = stepper.prefill(enc.input_ids, enc.attention_mask, positions)
            position, tokens = positions[:, -1:], []
            for _ in range(steps):
                token = out.logits.argmax(dim=-1)
                tokens.append(token)
                position = position + 1
                out = stepper.step(token, position)
        runs[name] = torch.stack(tokens, dim=1).cpu()
    windows = sorted({StaticSteps.window_for(stepper, enc.input_ids.shape[1] + s) for s in range(steps)})
    return {"sequences": len(prompts), "steps": steps, "windows": windows,
            "identical": int((runs["dynamic"] == runs["windowed"]).all(dim=1).sum())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-8b", choices=list(QWEN3_SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16], help="rows of the linears' comparison")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=4096, help="extra cache positions of the windowed comparison")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="shape fields to change, e.g. num_hidden_layers=1 (a CPU smoke run)")
    parser.add_argument("--skip", nargs="*", default=[], help="sections to leave out: window, breakdown, linears, "
                        "grouped, bf16-grouped, per-linear, gemlite, probe, collection, agreement, compile (every compiled step), "
                        "sums-torch (the compiled grouped 2-bit step with torch's split-K sums), 2bit (every 2-bit section), fused-compile "
                        "(the compiled 2-bit step with its projections apart), bf16-compile (the compiled bf16 step), "
                        "loop (a token through generate, grouped bf16 and grouped 2-bit)")
    parser.add_argument("--attention", nargs="+", default=list(DECODE_ATTENTIONS), choices=DECODE_ATTENTIONS,
                        help="decode attention compared in the step and its breakdown: the project's grouped one "
                        "(inference/decoding/attention.py) and HF's SDPA function; the first is used elsewhere")
    parser.add_argument("--compile-batches", nargs="*", type=int, default=[1],
                        help="batch sizes at which each precision's step is also measured through torch.compile "
                        "(with each --attention)")
    parser.add_argument("--max-decode-rows", type=int, default=None,
                        help="most rows the fused linears run through the kernel, up to kernels.MAX_ROWS (64) a call "
                        "(default inference.decoding.kernels.MAX_DECODE_ROWS; 16: more rows dequantize, as before "
                        "2026-12-02)")
    parser.add_argument("--deadline", type=float, default=330.0, help="seconds after which optional sections are skipped")
    parser.add_argument("--out", default="decode-step.json")
    args = parser.parse_args()
    began = time.perf_counter()
    torch.set_grad_enabled(False)

    def left() -> float:
        return args.deadline - (time.perf_counter() - began)

    import transformers

    if args.max_decode_rows is not None:
        kernels.MAX_DECODE_ROWS = args.max_decode_rows
    overrides = {field: int(value) for field, value in (item.split("=") for item in args.override)}
    spec = {**QWEN3_SHAPES[args.shape], **overrides}
    bandwidth = copy_bandwidth() if CUDA else 1e11
    report = {"device": torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
              "shape": args.shape, "spec": spec, "context": args.context, "max_decode_rows": args.max_decode_rows,
              "copy_bandwidth_bytes_per_s": bandwidth,
              "steps": [], "breakdown": {}, "linears": {}, "errors": {}, "loop": {}}
    print(f"{report['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)

    def guarded(key: str, work, into: dict | None = None):
        target = report if into is None else into
        try:
            target[key] = work()
        except Exception as error:  # noqa: BLE001 - a benchmark reports every failure and goes on
            traceback.print_exc()
            target[key] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
            if CUDA:
                torch.cuda.empty_cache()
        print(key, target[key], f"({time.perf_counter() - began:.0f} s)", flush=True)
        save()
        return target[key]

    def step_row(precision: str, kernel: str, bits: int, batch: int, attention: str, cache: int | None = None,
                 windowed: bool = True) -> dict:
        """One measured step's record, with its floor (its cache defaults to just past what the steps fill)."""
        return {"precision": precision, "kernel": kernel, "batch": batch, "context": args.context,
                "cache": cache or args.context + args.steps + 8, "windowed": windowed, "attention": attention,
                "floor_seconds": decode_step_bytes(spec, bits, 128, batch, args.context)["total"] / bandwidth}

    def timed_step(precision: str, kernel: str, bits: int, batch: int, compiled: bool, logits: dict | None = None):
        """The step at `batch` (compiled or not) over the first --attention, timed into a new row of the report.
        With `logits` (batch -> the uncompiled step's last logits), an uncompiled step's logits are kept there and
        a compiled step's are compared with them (the same tokens are fed at every call of one batch size)."""
        row = step_row(precision, kernel, bits, batch, args.attention[0])
        kept = {}
        guarded("step_seconds", lambda: step_latency(model, batch, args.context, args.steps, compile=compiled,
                                                     timings=row,
                                                     logits=kept if logits is not None else None), row)
        report["steps"].append(row)
        if "logits" in kept and not compiled:
            logits[batch] = kept["logits"]
        elif "logits" in kept and batch in logits:
            reference = logits[batch]
            row["logits_vs_uncompiled"] = {
                "relative_error": float((kept["logits"] - reference).norm() / reference.norm()),
                "argmax_agreement": float((kept["logits"].argmax(-1) == reference.argmax(-1)).float().mean())}
            print("compiled against uncompiled logits", row["logits_vs_uncompiled"], flush=True)
        return row

    compiling = [batch for batch in args.compile_batches if "compile" not in args.skip and CUDA]
    model = build_bf16(args.shape, **overrides) if CUDA else build_bf16_cpu(args.shape, **overrides)
    layer_bytes = {16: sum(k * n * 2 for k, n in linear_shapes(spec)),
                   2: decode_step_bytes(spec, 2, 128)["linears"] / spec["num_hidden_layers"]}
    for precision, bits in (("bf16", 16), ("2bit", 2)):
        if bits == 2 and "2bit" in args.skip:
            break
        if bits == 2:
            if CUDA:  # the compiled bf16 steps and their graphs must not keep the bf16 weights alive
                torch._dynamo.reset()
            gc.collect()
            report["quantized_linears"] = quantize_with_gptqmodel(model) if has_gptqmodel() else quantize_standalone(model)
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()
        kernel = "cuBLAS" if bits == 16 else "fused"
        for batch in args.batches:
            points = [(None, True, attention) for attention in args.attention]
            if "window" not in args.skip:
                points += [(args.context + args.budget, False, args.attention[0]),
                           (args.context + args.budget, True, args.attention[0])]
            for cache, windowed, attention in points:
                row = step_row(precision, kernel, bits, batch, attention, cache, windowed)
                use_decode_attention(model, attention)
                guarded("step_seconds", lambda: step_latency(model, batch, args.context, args.steps, max_length=cache,
                                                             windowed=windowed, timings=row), row)
                report["steps"].append(row)
            use_decode_attention(model, args.attention[0])
        compiles = [(batch, attention) for batch in args.compile_batches for attention in args.attention]
        for batch, attention in compiles if "compile" not in args.skip and CUDA else ():
            if left() < 100:  # a compile of the 8B step warmed up in 32-77 s on an H100 (2026-12-06)
                break
            if bits == 2 and "fused-compile" in args.skip:  # the grouped 2-bit step is still compiled, last
                break
            if bits == 16 and "bf16-compile" in args.skip:
                break
            row = step_row(precision, kernel + " + compile", bits, batch, attention)
            use_decode_attention(model, attention)
            guarded("step_seconds", lambda: step_latency(model, batch, args.context, args.steps, compile=True,
                                                         timings=row), row)
            report["steps"].append(row)
        use_decode_attention(model, args.attention[0])
        for batch in args.batches if "breakdown" not in args.skip else ():
            guarded(f"{precision}_b{batch}", lambda: breakdown(model, spec, bits, batch, args.context, args.steps,
                                                                bandwidth), report["breakdown"])
        linears = [layer_linears(layer) for layer in model.model.layers]
        for rows in args.rows if "linears" not in args.skip else ():
            guarded(f"{kernel}_rows{rows}", lambda: {"seconds_per_layer": linears_seconds(linears, rows, model.dtype)
                                                     / len(linears),
                                                     "floor_seconds": layer_bytes[bits] / bandwidth}, report["linears"])
        if bits == 16 and "bf16-grouped" not in args.skip:
            # The bf16 step and linears with q/k/v and gate/up as one matmul each, then apart again: the 2-bit
            # twin is quantized from the projections.
            report["bf16_grouped_projections"] = group_linear_projections(model)
            points = [(batch, False) for batch in args.batches]
            points += [(batch, True) for batch in compiling]
            uncompiled = {}  # batch -> the uncompiled grouped step's logits, which the compiled ones are held to
            for batch, compiled in points:
                if left() < (100 if compiled else 20):
                    break
                timed_step("bf16", "cuBLAS grouped" + (" + compile" if compiled else ""), 16, batch, compiled,
                           logits=uncompiled)
            if "loop" not in args.skip and left() > 40:
                guarded("bf16_grouped", lambda: loop_costs(model, args.batches, args.context, compiling),
                        report["loop"])
            calls = [[m.group if isinstance(m, GroupedMember) else m for m in layer_linears(layer)
                      if getattr(m, "index", 0) == 0] for layer in model.model.layers]
            for rows in args.rows if "linears" not in args.skip and left() > 30 else ():
                guarded(f"cuBLAS-grouped_rows{rows}", lambda: {
                    "seconds_per_layer": linears_seconds(calls, rows, model.dtype) / len(calls),
                    "floor_seconds": layer_bytes[16] / bandwidth}, report["linears"])
            ungroup_projections(model)
            del calls  # the bf16 groups hold every projection's weight: a 32B twin would not fit an 80 GB card
        if bits == 2 and "grouped" not in args.skip and "linears" not in args.skip and left() > 60:
            grouped = [grouped_layer(layer) for layer in model.model.layers]
            for rows in args.rows:
                guarded(f"fused-grouped_rows{rows}", lambda: {
                    "seconds_per_layer": linears_seconds(grouped, rows, model.dtype) / len(grouped),
                    "floor_seconds": layer_bytes[bits] / bandwidth}, report["linears"])
            if "per-linear" not in args.skip:
                guarded("per_linear", lambda: per_linear_seconds(linears, grouped, args.rows, model.dtype, bandwidth))
            del grouped
            if CUDA:
                torch.cuda.empty_cache()
        del linears  # the bf16 linears must go before quantization
    layers_watched = [spec["num_hidden_layers"] // 2, 3 * spec["num_hidden_layers"] // 4, spec["num_hidden_layers"] - 1]
    if "probe" not in args.skip and CUDA:
        def probe_overhead():
            base = min(step_latency(model, 1, args.context, args.steps) for _ in range(2))
            probe = InGraphProbe(layers_watched, spec["hidden_size"], 1)
            watched = min(step_latency(model, 1, args.context, args.steps, probe=probe, layers=layers_watched)
                          for _ in range(2))
            return {"step_seconds": base, "with_probe_seconds": watched, "overhead": watched / base - 1}
        guarded("probe_b1", probe_overhead)
    if "collection" not in args.skip and CUDA:
        guarded("collection_b16", lambda: collection_rate(model, layers_watched, 16, 128))
    if "agreement" not in args.skip:
        guarded("windowed_agreement", windowed_agreement)
    if "gemlite" not in args.skip and left() > 60:
        def gemlite_section():
            import gemlite

            built = time.perf_counter()
            layers = [[GemLiteA16W2(m) for m in layer_linears(layer)] for layer in model.model.layers]
            result = {"version": gemlite.__version__, "pack_seconds": time.perf_counter() - built, "rows": {}}
            result["relative_error"] = relative_errors(model.model.layers[0],
                                                       {"fused": layer_linears(model.model.layers[0]),
                                                        "gemlite": layers[0]})
            save()
            for rows in args.rows:
                tuned = time.perf_counter()
                seconds = linears_seconds(layers, rows, model.dtype) / len(layers)
                result["rows"][rows] = {"seconds_per_layer": seconds, "floor_seconds": layer_bytes[2] / bandwidth,
                                        "first_call_seconds": time.perf_counter() - tuned}
                print("gemlite rows", rows, result["rows"][rows], flush=True)
                if left() < 20:
                    break
            return result
        guarded("gemlite", gemlite_section)
    if "grouped" not in args.skip and report.get("quantized_linears") and left() > 30:
        # The 2-bit step again with q/k/v and gate/up as one kernel call each (group_2bit_projections).
        report["grouped_projections"] = group_2bit_projections(model)
        # Compiled: with the split-K sums kernel (kernels.SPLIT_SUMS "kernel", the default), then with the sums
        # left to torch, which inductor may fuse into what reads each product ("auto").
        points = [(batch, False, "kernel") for batch in args.batches]
        points += [(batch, True, "kernel") for batch in compiling]
        points += [(batch, True, "auto") for batch in compiling if "sums-torch" not in args.skip]
        uncompiled = {}  # batch -> the uncompiled grouped step's logits, which the compiled ones are held to
        for batch, compiled, sums in points:
            if left() < (100 if compiled else 20):
                break
            kernels.SPLIT_SUMS = sums
            name = "fused grouped" + (" + compile" if compiled else "") + (", sums in torch" if sums == "auto" else "")
            timed_step("2bit", name, 2, batch, compiled, logits=uncompiled)
        kernels.SPLIT_SUMS = "kernel"
        if "loop" not in args.skip and left() > 40:
            guarded("2bit_grouped", lambda: loop_costs(model, args.batches, args.context, compiling), report["loop"])
    save()
    print(tables(report))


def has_gptqmodel() -> bool:
    try:
        import gptqmodel  # noqa: F401
    except ImportError:
        return False
    return CUDA  # its modules are built on the GPU here; a CPU smoke run builds the standalone ones


def quantize_with_gptqmodel(model) -> int:
    from decode import quantize_randomly

    from inference.decoding.kernels import fuse_2bit_linears

    quantize_randomly(model, "gptq-triton")
    return fuse_2bit_linears(model)


def build_bf16_cpu(shape: str, **overrides):
    """The shape's model in float32 on the CPU (a smoke run of this script)."""
    from transformers import Qwen3ForCausalLM

    from inference.decoding.shapes import qwen3_config

    torch.manual_seed(0)
    return Qwen3ForCausalLM(qwen3_config(shape, attn_implementation="sdpa", **overrides)).eval()


def tables(report: dict) -> str:
    ms = 1e3
    lines = [f"{report['device']}, copy bandwidth {report['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, "
             f"{report['shape']}, context {report['context']}", "",
             "| precision | kernel | attention | batch | cache | windowed | ms / step | floor ms | x floor | first replays ms |",
             "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in report["steps"]:
        seconds = r.get("step_seconds")
        if not isinstance(seconds, float):
            lines.append(f"| {r['precision']} | {r['kernel']} | {r.get('attention', 'hf')} | {r['batch']} | "
                         f"{r['cache']} | {r['windowed']} | {seconds} | {r['floor_seconds'] * ms:.3f} | - | - |")
            continue
        first = r.get("first_replays_seconds", float("nan"))
        lines.append(f"| {r['precision']} | {r['kernel']} | {r.get('attention', 'hf')} | {r['batch']} | "
                     f"{r['cache']} | {r['windowed']} | {seconds * ms:.3f} | {r['floor_seconds'] * ms:.3f} | "
                     f"{seconds / r['floor_seconds']:.2f} | {first * ms:.3f} |")
    lines += ["", "| step at | part | ms | floor ms | x floor | share of step |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for point, parts in report["breakdown"].items():
        if "error" in parts:
            lines.append(f"| {point} | {parts['error']} | | | | |")
            continue
        step = parts["step"]["seconds"]
        for name, part in parts.items():
            if not isinstance(part, dict):
                lines.append(f"| {point} | {name} | {part:.2e} | | | |")
                continue
            floor = part["floor_seconds"]
            ratio = f"{part['seconds'] / floor:.1f}" if floor else "-"
            lines.append(f"| {point} | {name} | {part['seconds'] * ms:.3f} | {floor * ms:.4f} | {ratio} | "
                         f"{part['seconds'] / step:.0%} |")
    lines += ["", "| linears of one layer | rows | us | floor us | x floor |", "| --- | ---: | ---: | ---: | ---: |"]
    entries = [(key.rsplit("_rows", 1)[0], int(key.rsplit("_rows", 1)[1]), value)
               for key, value in report["linears"].items()]
    gem = report.get("gemlite", {})
    entries += [("gemlite A16W2", int(rows), value) for rows, value in gem.get("rows", {}).items()]
    for name, rows, value in entries:
        if "error" in value:
            lines.append(f"| {name} | {rows} | {value['error']} | | |")
            continue
        lines.append(f"| {name} | {rows} | {value['seconds_per_layer'] * 1e6:.1f} | {value['floor_seconds'] * 1e6:.1f} "
                     f"| {value['seconds_per_layer'] / value['floor_seconds']:.2f} |")
    loop = {name: rows for name, rows in report.get("loop", {}).items() if "error" not in rows}
    if loop:
        lines += ["", "| model | batch | path | greedy ms / token | sampled, draw in step | sampled, draw after |",
                  "| --- | ---: | --- | ---: | ---: | ---: |"]
        for name, rows in loop.items():
            for batch, row in rows.items():
                redone = row.get("sampled_in_step_choose_share")
                redone = f" ({redone:.0%} redrawn)" if redone is not None else ""
                lines.append(f"| {name} | {batch} | {row['decode']} | {row['greedy'] * ms:.3f} | "
                             f"{row['sampled_in_step'] * ms:.3f}{redone} | {row['sampled_after_step'] * ms:.3f} |")
    per_linear = report.get("per_linear", {})
    if per_linear and "error" not in per_linear:
        rows_keys = [key for key in next(iter(per_linear.values())) if key.startswith("rows_")]
        lines += ["", "| 2-bit call | floor us | " + " | ".join(f"{key[5:-3]} rows us (x floor)" for key in rows_keys) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in rows_keys) + " |"]
        for name, value in per_linear.items():
            cells = " | ".join(f"{value[key]:.1f} ({value[key] / value['floor_us']:.1f}x)" for key in rows_keys)
            lines.append(f"| {name} | {value['floor_us']:.2f} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
