"""Decode attention for grouped-query models that reads each layer's keys and values once.

Qwen3 has fewer key/value heads than query heads (8 for 16 or 32). On CUDA, HF's SDPA path passes them
to `scaled_dot_product_attention` as grouped heads only when no mask is given; with the 4D mask of a
padded batch (every batch `generate` runs) it first copies keys and values out to one head per query
head (`repeat_kv`). A decode step then writes and reads two to four copies of the cache it only needs to
read, in every layer. transformers 5.24 packs the single query of a decode step onto the key/value
heads instead, but not under torch.compile, and earlier 5.x releases never do.

`grouped_attention` does that packing always: a decode step's query [batch, heads, 1, dim] becomes
[batch, kv_heads, heads / kv_heads, dim], so that the G query heads of one key/value head are G query rows
of one attention over that head's keys, and the mask [batch, 1, 1, length] broadcasts over them. Every
other call (prefill, one key/value head per query head, per-head masks) goes to HF's own SDPA function.
Query head h attends with key/value head h // G in both, as in `repeat_kv`.

`split_kv_attention` (registered as `SPLIT_KV`) runs the same packed decode attention through a Triton
kernel instead of SDPA. SDPA's kernels give a decode step one program per (row, key/value head) and
walk the whole cache in it: at batch 1 that is 8 programs for Qwen3-8B's 8 key/value heads, on a GPU
of 132 SMs, so each layer's attention takes about 34 us against a 1 us floor (H200, 1k context). The
kernel splits the cache into chunks too (flash decoding): each program attends the G query rows of
one key/value head over one chunk and writes its partial output, running maximum and sum; a second
small kernel combines the chunks in a fixed order (no atomics, reruns agree bit for bit). With one
chunk the first kernel writes the output itself.

`use_grouped_attention` registers both with transformers' attention interfaces and switches a model to
one (`SPLIT_KV` where Triton is installed). The loaders do that on CUDA only: on a CPU the copies are
cheap, and a different summation order there would change the embedded models' recorded traces.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: split_kv_attention falls back to grouped_attention
    triton = None

GROUPED = "lowbit_grouped_sdpa"
"""The packed SDPA attention's name in transformers' AttentionInterface."""
SPLIT_KV = "lowbit_split_kv"
"""The split-cache Triton decode attention's name in transformers' AttentionInterface."""


def grouped_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """HF's attention-function signature: (output [batch, q_len, heads, dim], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    if not _packable(query, groups, attention_mask, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    packed = query.reshape(batch, heads // groups, groups, dim)
    output = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask,
                                                              dropout_p=dropout, scale=scaling)
    return output.reshape(batch, 1, heads, value.shape[-1]), None


def _packable(query: torch.Tensor, groups: int, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
    """A decode step (one query position) of a grouped model with a [batch, 1, 1, length] mask or none."""
    return not (query.shape[2] != 1 or groups == 1 or kwargs.get("position_bias") is not None
                or kwargs.get("softcap") is not None or kwargs.get("output_attentions", False)
                or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1
                                                    or attention_mask.shape[2] != 1)))


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton runs kernels in its CPU interpreter (tests), so the kernel takes CPU tensors too."""

BLOCK_G = 16
"""Query rows of one program: the G query heads of a key/value head, padded to tl.dot's 16 rows."""
BLOCK_N = 64
"""Keys per inner step of a program; a chunk is a multiple of it."""
TARGET_PROGRAMS = 4 * 132
"""Programs to aim for: about four per SM of an H100 or H200 (132 SMs); fewer SMs run more waves."""
MAX_SPLITS = 64


def attention_plan(batch: int, kv_heads: int, length: int) -> dict:
    """Chunk length, chunks per (row, key/value head) and grid of `decode_attention`: arithmetic on the shape.

    As many chunks as bring the grid to about TARGET_PROGRAMS, each a multiple of BLOCK_N keys, then as
    few chunks as keep that chunk length."""
    blocks = -(-length // BLOCK_N)
    splits = max(1, min(blocks, MAX_SPLITS, -(-TARGET_PROGRAMS // (batch * kv_heads))))
    chunk = -(-blocks // splits) * BLOCK_N
    splits = -(-length // chunk)
    return {"chunk": chunk, "splits": splits, "grid": (batch * kv_heads, splits)}


def _jit(kernel):
    return triton.jit(kernel) if triton is not None else kernel


# Builtins only inside the kernels (tl.reduce with Triton's own combiners, not tl.sum / tl.max): the
# @jit-defined helpers run in the CPU interpreter only if TRITON_INTERPRET was set before triton was
# first imported, which the tests cannot ensure (as in kernels.py).
@_jit
def _split_kv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, acc_ptr, stat_ptr,
    sq_b, sq_h, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, sm_b, sm_n,
    kv_heads, groups, length, chunk, splits, scale_log2,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_KIND: tl.constexpr,
    DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr, GATED: tl.constexpr = True,
):
    """The G query rows of key/value head h of row b, over keys [split * chunk, (split + 1) * chunk).

    Grid (batch * kv_heads, splits). MASK_KIND 0: no mask; 1: boolean (True attends); 2:
    additive float. With a boolean mask and GATED, the keys and values of masked positions are not
    loaded at all (the mask is read first): the static cache's window past the last written slot, and
    a left-padded row's padding, cost their mask bytes only. DIRECT (one split): writes the normalised
    output [batch, kv_heads, G, dim] in its dtype; else the float32 partial output [bh, splits, G, dim]
    and (max, sum) [bh, splits, G, 2], both in base 2.
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // kv_heads
    h = bh % kv_heads
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    rows = g < groups
    q = tl.load(q_ptr + b * sq_b + (h * groups + g[:, None]) * sq_h + d[None, :] * sq_d, mask=rows[:, None],
                other=0.0)
    running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    running_sum = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, HEAD_DIM], 0.0, tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        keep = n < end
        loads = keep  # GATED=False (the benchmark's baseline) also loads the positions the mask closes
        if MASK_KIND == 1:
            keep = keep & (tl.load(mask_ptr + b * sm_b + n * sm_n, mask=keep, other=0) != 0)
            if GATED:
                loads = keep
        k = tl.load(k_base + n[:, None] * sk_n + d[None, :] * sk_d, mask=loads[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        if MASK_KIND == 2:
            scores += tl.load(mask_ptr + b * sm_b + n * sm_n, mask=keep, other=0.0).to(tl.float32) * 1.4426950408889634
        scores = tl.where(keep[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.reduce(scores, 1, tl.standard._elementwise_max))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(scores - safe_max[:, None])
        alpha = tl.exp2(running_max - safe_max)
        running_sum = running_sum * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        v = tl.load(v_base + n[:, None] * sv_n + d[None, :] * sv_d, mask=loads[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        running_max = new_max
    if DIRECT:
        out = tl.where(running_sum[:, None] > 0, acc / running_sum[:, None], 0.0)
        tl.store(out_ptr + (bh * groups + g[:, None]) * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=rows[:, None])
    else:
        slot = (bh * splits + split) * groups + g
        tl.store(acc_ptr + slot[:, None] * HEAD_DIM + d[None, :], acc, mask=rows[:, None])
        tl.store(stat_ptr + slot * 2, running_max, mask=rows)
        tl.store(stat_ptr + slot * 2 + 1, running_sum, mask=rows)


@_jit
def _combine_kernel(acc_ptr, stat_ptr, out_ptr, groups, splits,
                    SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """out[bh, g] = sum over chunks of 2**(max - M) * acc / sum over chunks of 2**(max - M) * sum.

    Grid (batch * kv_heads * G,); the chunks are added in an order fixed when the kernel compiles."""
    row = tl.program_id(0)
    bh = row // groups
    g = row % groups
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    present = s < splits
    slot = (bh * splits + s) * groups + g
    maxima = tl.load(stat_ptr + slot * 2, mask=present, other=float("-inf"))
    sums = tl.load(stat_ptr + slot * 2 + 1, mask=present, other=0.0)
    top = tl.reduce(maxima, 0, tl.standard._elementwise_max)
    weights = tl.exp2(maxima - tl.where(top == float("-inf"), 0.0, top))
    acc = tl.load(acc_ptr + slot[:, None] * HEAD_DIM + d[None, :], mask=present[:, None], other=0.0)
    numerator = tl.reduce(acc * weights[:, None], 0, tl.standard._sum_combine)
    denominator = tl.reduce(sums * weights, 0, tl.standard._sum_combine)
    out = tl.where(denominator > 0, numerator / denominator, 0.0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def kernel_runs(query: torch.Tensor, key: torch.Tensor, groups: int) -> bool:
    """Whether `decode_attention` takes these: Triton present, CUDA tensors (or the interpreter), a head
    size that is a power of two from 16 to 256, at most BLOCK_G query heads per key/value head."""
    dim = query.shape[-1]
    return (triton is not None and (query.is_cuda or _INTERPRETED) and 16 <= dim <= 256 and dim & (dim - 1) == 0
            and key.shape[-1] == dim and 1 <= groups <= BLOCK_G)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, gated: bool = True) -> torch.Tensor:
    """Attention of one query position: query [batch, heads, 1, dim] over key / value [batch, kv_heads, length,
    dim] (query head h reads key/value head h // (heads / kv_heads)), mask [batch or 1, 1, 1, length]
    (boolean, True attends; or additive float) or None. Returns [batch, 1, heads, dim] in query's dtype.

    No host sync and a grid fixed by the shapes, so CUDA graphs capture it. Under torch.compile it is one
    opaque operator (`lowbit::decode_attention`): inductor calls the two launches as they are instead of
    recompiling the kernels' source in its own workers, which failed for this kernel on an H200
    (torch 2.11, `InductorError: SubprocException`).
    `gated=False` (benchmarks only) also reads the keys and values of positions a boolean mask closes."""
    if torch.compiler.is_compiling():
        return _decode_attention_op(query, key, value, mask, scale)
    return _launch(query, key, value, mask, scale, gated)


def _launch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            scale: float, gated: bool = True) -> torch.Tensor:
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    plan = attention_plan(batch, kv_heads, length)
    splits = plan["splits"]
    # [batch, 1, heads, dim] is [batch, kv_heads, groups, dim] in memory: query head h = kv head * groups + g.
    out = torch.empty(batch, 1, heads, dim, dtype=query.dtype, device=query.device)
    if mask is None:
        mask_kind, mask_arg, strides = 0, out, (0, 0)
    else:
        if mask.shape[-1] != length:
            raise ValueError(f"decode_attention: mask covers {mask.shape[-1]} positions, the cache {length}")
        mask_kind, mask_arg = (1 if mask.dtype == torch.bool else 2), mask
        strides = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(-1))
    direct = splits == 1
    acc = out if direct else torch.empty(batch * kv_heads, splits, groups, dim, dtype=torch.float32,
                                         device=query.device)
    stat = out if direct else torch.empty(batch * kv_heads, splits, groups, 2, dtype=torch.float32,
                                          device=query.device)
    exact = query.dtype == torch.float32
    _split_kv_kernel[plan["grid"]](
        query, key, value, mask_arg, out, acc, stat,
        query.stride(0), query.stride(1), query.stride(3), *key.stride(), *value.stride(), *strides,
        kv_heads, groups, length, plan["chunk"], splits, scale * 1.4426950408889634,
        BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, HEAD_DIM=dim, MASK_KIND=mask_kind, DIRECT=direct,
        DOT_PRECISION="ieee" if exact else "tf32", GATED=gated, num_warps=4,
    )
    if not direct:
        _combine_kernel[(batch * kv_heads * groups,)](acc, stat, out, groups, splits,
                                                      SPLITS=triton.next_power_of_2(splits), HEAD_DIM=dim)
    return out


# A module loaded with TRITON_INTERPRET=1 (the tests' private copy) registers its own operator.
@torch.library.custom_op("lowbit::decode_attention" + ("_interpreted" if _INTERPRETED else ""), mutates_args=())
def _decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    return _launch(query, key, value, mask, scale)


@_decode_attention_op.register_fake
def _(query, key, value, mask, scale):
    batch, heads, _, dim = query.shape
    return query.new_empty(batch, 1, heads, dim)


def split_kv_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs):
    """HF's attention-function signature; decode steps the kernel takes run `decode_attention`, the rest
    `grouped_attention`."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (dropout == 0.0 and _packable(query, groups, attention_mask, kwargs) and kernel_runs(query, key, groups)
            and value.shape[-1] == query.shape[-1]):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return decode_attention(query, key, value, attention_mask, scale), None
    return grouped_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             is_causal=is_causal, **kwargs)


def register() -> None:
    """Make `GROUPED` and `SPLIT_KV` valid attn_implementations (with SDPA's mask builder); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED, grouped_attention)
    AttentionMaskInterface.register(GROUPED, sdpa_mask)
    AttentionInterface.register(SPLIT_KV, split_kv_attention)
    AttentionMaskInterface.register(SPLIT_KV, sdpa_mask)


OURS = (GROUPED, SPLIT_KV)


def use_grouped_attention(model, kernel: bool = True) -> bool:
    """Switch a model whose attention is HF's SDPA (or one of ours) to `SPLIT_KV` (`kernel` and Triton
    installed) or `GROUPED`; returns whether it now runs one of them.

    Models on another implementation (eager, flash attention) keep it."""
    current = getattr(model.config, "_attn_implementation", None)
    if current != "sdpa" and current not in OURS:
        return False
    target = SPLIT_KV if kernel and triton is not None else GROUPED
    if current != target:
        register()
        model.set_attn_implementation(target)
    return model.config._attn_implementation == target


def use_hf_attention(model) -> None:
    """Back to HF's own SDPA function (benchmarks compare them on one model)."""
    if getattr(model.config, "_attn_implementation", None) in OURS:
        model.set_attn_implementation("sdpa")


DECODE_ATTENTIONS = ("split", "grouped", "hf")
"""The attentions benchmarks compare by name: `split` (the split-cache kernel), `grouped` (packed SDPA)
and `hf` (HF's SDPA function)."""


def use_decode_attention(model, name: str) -> None:
    """Switch a model to one of DECODE_ATTENTIONS."""
    if name not in DECODE_ATTENTIONS:
        raise ValueError(f"decode attention must be one of {', '.join(DECODE_ATTENTIONS)}, got {name!r}")
    if name == "hf":
        use_hf_attention(model)
    else:
        use_grouped_attention(model, kernel=name == "split")
