"""A fused 2-bit GPTQ matmul for decoding: activations times packed weights, never unpacking the
whole weight.

GPTQModel's 2-bit backends (`TorchLinear`, `TritonV2Linear`) dequantize the full [K, N] weight on
every call and then run a dense matmul, so one decoded token reads the packed weight, writes and
reads a 16-bit copy of it, and ends up slower than plain bf16. Here each Triton program unpacks
only the tile it multiplies, in registers, so a decoding step reads 2 bits per weight plus one
fp16 scale and one 2-bit zero point per group of G weights: about 7x fewer bytes than bf16 at
G = 64, 7.5x at G = 128.

Buffers, as `TorchLinear` holds them after `post_init` (GPTQ "v2" zero points):

    qweight int32 [K/16, N]     word (r, n) packs W codes of rows k = 16r .. 16r+15 of column n,
                                the code of row 16r + i in bits 2i, 2i+1
    qzeros  int32 [K/G, N/16]   word (g, c) packs the zero points of columns 16c .. 16c+15 of
                                group g in the same bit order
    scales  fp16/bf16 [K/G, N]
    W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]

"v2" means the zero point is used as stored. GPTQ "v1" checkpoints store z - 1; GPTQModel adds the
1 back when it loads them for these backends (`convert_gptq_v1_to_v2_format`), and
`TorchLinear.dequantize_weight` never subtracts it, whatever `qzero_format()` reports.

What makes it fast (a decoding step has 2 bits of weight per multiply-add, so unpacking, not
arithmetic, is what costs, and each layer is too small to fill an H100 without care):

- Each packed word is loaded once, as a [BLOCK_K / 16, BLOCK_N] tile (rows of qweight are
  contiguous along N, so a warp reads 512 contiguous bytes), and widened to its 16 codes in
  registers.
- No integer-to-float conversion per weight (the H100 converts at 1/8 of its FMA rate): each code
  is shifted into the high mantissa bits of a float whose exponent bits are set, which makes that
  float exactly 2**e + q (e = 6, 4 or 2, so three codes share one shift). The zero point and the
  scale are constant over a K tile (a tile never straddles a group), so they, and the 2**e offset,
  are applied once per tile and column to the sum: for every row m,
      sum_k x[m, k] * W[k, n] = s[n] * (sum_k x[m, k] * (2**e_k + q[k, n])
                                        - sum_k x[m, k] * 2**e_k - z[n] * sum_k x[m, k]).
  That is one shift per three weights, one logic op and one FMA (or a tensor-core MAC) per weight.
  The result is W's exact product in float32: unlike TorchLinear's forward, W is never rounded to
  the scales' or x's dtype (the difference is that rounding, about 2**-9 of a bf16 weight).
- One row (batch-1 decoding) multiplies on the FMA units, summing over K in registers (compiled for sm_90, its
  K loop issues 4.06 instructions a weight, `benchmarks/kernel_sass.py`; an unrolled variant with FMA chains and
  3.55 was slower on an H200, docs/results.md "The one-row tile's instructions"); 2..64 rows
  go through tl.dot, as one tile of 16, 32 or 64 rows (masked), so that each weight tile is read and
  unpacked once for the whole batch.
- A layer's few thousand 4 KB tiles are too little work per column block to keep HBM busy with
  one program per block, so K is split too (split-K) until there are about three programs per
  H100 SM (`launch_plan`), each prefetching its next tile while it unpacks the current one; a
  second small kernel adds the float32 partial sums in a fixed order (no atomics, so reruns agree
  bit for bit). With one split the kernel writes the output itself.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: this module imports, gptq2_matmul says why not
    triton = None

MAX_ROWS = 64
"""Most activation rows one fused-kernel call takes: one tl.dot tile of 16, 32 or 64 rows (decoding
batches). Until 2026-12-03 it was 16, and a batch of 64 was four calls, each rereading and unpacking
the whole packed weight (`benchmarks/rehearsal.py` times both on the collection batch)."""

MAX_DECODE_ROWS = 64
"""Most rows `Fused2BitLinear` runs through the kernel, MAX_ROWS at a time. More rows (prefill) are
multiplied by the whole dequantized weight (`PREFILL`)."""

PREFILL_PATHS = ("gptqmodel", "dequantize")
PREFILL = "dequantize"
"""How `Fused2BitLinear` runs a call of more than MAX_DECODE_ROWS rows (prefill): `gptqmodel`, the GPTQ
module's own forward (GPTQModel's Triton dequantization of the whole weight, then a matmul), or
`dequantize`, `gptq2_dequantize` (one pass over the packed buffers, one write of W) then a matmul.
`benchmarks/prefill.py` times both against bf16: on one H100 (2026-12-06, Qwen3-8B shape, 1,024 tokens) the
2-bit prefill took 3.01x bf16's time through `gptqmodel` and 1.05x through `dequantize`, with equal logits."""

WARPS = {1: 4, 16: 4, 32: 8, 64: 8}
"""Warps of a program by its tile rows (`launch_plan`'s block_m). 4 was measured best at 1 and 16 rows
on an H100. The 32- and 64-row tiles take 8, so that their accumulator and activation tiles leave room
in registers for the unpacked weight tile; 8 is chosen, not measured against 4. On an H200, 64 rows of
the Qwen3-8B shape collected at 8,192 in 269.8 s with these tiles, against 307.0 s in 16-row tiles
(two runs)."""

H100_SMS = 132
TARGET_PROGRAMS = 3 * H100_SMS
"""Programs to aim for with split-K: about three per SM of an H100 (measured best among one to
eight on the Qwen3-8B shapes), so that each SM has loads in flight while it unpacks. Fewer SMs
(smaller GPUs) just run more waves."""

SPLIT_SUMS_PATHS = ("kernel", "torch", "auto")
SPLIT_SUMS = "kernel"
"""Who adds a split-K call's float32 partial sums: `kernel`, `_sum_splits_kernel` (one launch, the sums in a
fixed order); `torch`, `partial.sum(0)` in torch, which torch.compile can fuse into what reads the product
next (the norms, rotary, activation and residual adds of a compiled step), so that the call is one launch,
not two; `auto`, torch while torch.compile traces, the kernel otherwise. Either way the order is fixed when
the code compiles, so reruns agree bit for bit; the two orders differ by float32 rounding. `kernel` stays the
default until a GPU run of `benchmarks/decode_step.py` (which times the compiled grouped 2-bit step both
ways) shows `auto` faster: on the CPU the torch path is tested in Triton's interpreter only, not compiled."""

_FLOAT_BITS = {torch.float32: (23, 127), torch.float16: (10, 15), torch.bfloat16: (7, 127)}
"""Mantissa bits and exponent bias of each x dtype, for building 2**e + q directly as float bits."""


def _jit(kernel):
    return triton.jit(kernel) if triton is not None else kernel


# Inside kernels, builtins only: Triton's own @jit-defined helpers (tl.sum, tl.zeros, ...) run in
# its CPU interpreter only if TRITON_INTERPRET was set before triton was first imported, which the
# tests cannot ensure. So tl.full for zeros, and sums as tl.reduce with Triton's own add combiner
# (the interpreter recognises that one and sums with numpy).
@_jit
def _gptq2_matmul_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, bias_ptr, out_ptr, partial_ptr,
    M, N, K, group_size, zeros_stride, split_k, top_exponent_bits,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr, FOLD_OFFSETS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """x[:M] @ W[:, n block] over the K tiles pid_k, pid_k + split_k, ... of this program.

    Grid (N / BLOCK_N, split_k). BLOCK_M == 1: one row, on the FMA units; else tl.dot. BLOCK_K
    divides G (or there is one group), so each tile needs one row of scales and zeros. split_k == 1:
    writes out [M, N] in its dtype, bias added; else the float32 partial sums [split_k, M, N].
    FOLD_OFFSETS: subtract the 2**e offsets once per tile from the sums (cheap, but the cancellation
    costs about 2**-17 relative accuracy; fine for 16-bit x) rather than from every weight (exact,
    for float32 x). top_exponent_bits is (exponent bias + 6) << MANTISSA_BITS, passed at run time
    so that masking a code and setting its exponent compile to one LOP3 (a constant would need two).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    zero_shifts = 2 * (cols % 16)
    # [word row, code, column]: words are loaded as [BK/16, 1, BN], so the 16 codes of a word stay
    # in the registers of the thread that loaded it, and that load's layout (4 contiguous columns
    # per thread) is the layout of everything after it.
    word_rows = tl.arange(0, BLOCK_K // 16)[:, None, None]
    fields = tl.arange(0, 16)[None, :, None]  # code i of a word: row 16r + i, bits 2i and 2i + 1
    cols3 = cols[None, None, :]

    # Code i becomes the float 2**e + q: bits (bias + e) << MANTISSA_BITS for 2**e, and q moved to
    # bit MANTISSA_BITS - e, where its unit is 1. e = 6, 4, 2 for i % 3 = 0, 1, 2, so codes
    # 3j, 3j + 1, 3j + 2 all land in place with the same shift of the word (a left shift for the
    # low codes, a right one for the high). 2**e + q is exact in fp32, fp16 and bf16 alike.
    exponent = 6 - 2 * (fields % 3)
    shift = (MANTISSA_BITS - exponent) - 2 * fields
    left = tl.maximum(shift, 0)
    right = tl.maximum(-shift, 0)
    code_mask = 3 << (MANTISSA_BITS - exponent)
    exponent_bits = top_exponent_bits - ((6 - exponent) << MANTISSA_BITS)
    offsets = (1 << exponent).to(tl.float32)  # 2**e of each code, [1, 16, 1]

    # x[m, k0 + x_k] for the tile at k0: one row as [r, i] with k - k0 = 16r + i (loaded in 2D: a
    # 3D load would be a layout anchor that Triton may prefer over the words' for the product; it
    # did, and spilled), or [m, k - k0] for tl.dot.
    if BLOCK_M == 1:
        rows = tl.arange(0, 1)
        x_k = 16 * tl.arange(0, BLOCK_K // 16)[:, None] + tl.arange(0, 16)[None, :]
        x_ptrs = x_ptr + x_k
        x_ok = x_k < BLOCK_K  # every row of x exists (the one)
        acc = tl.full((BLOCK_K // 16, BLOCK_N), 0.0, dtype=tl.float32)
    else:
        rows = tl.arange(0, BLOCK_M)
        x_k = tl.arange(0, BLOCK_K)[None, :]
        x_ptrs = x_ptr + rows[:, None] * K + x_k
        x_ok = rows[:, None] < M
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    x_offsets = (1 << (6 - 2 * (x_k % 16 % 3))).to(tl.float32)  # 2**e of each x_k
    words_ptrs = qweight_ptr + word_rows * N + cols3

    # The loads of a program's next tile are issued before its current tile is unpacked, so memory
    # and arithmetic overlap within the program (Triton's own pipelining, num_stages, only stages
    # loads that feed tl.dot, and slowed the tl.dot path down here). Loading two tiles ahead was
    # slower (3-14% at one row, 1-33% at 16, one H100, `benchmarks/kernel_plans.py` at commit
    # fe5832a). Each word is needed by this program only, x by every N block: the cache hints say
    # so. Tiles past K load nothing.
    k0 = pid_k * BLOCK_K
    step = split_k * BLOCK_K
    words = tl.load(words_ptrs + (k0 // 16) * N, mask=(k0 + 16 * word_rows < K) & (cols3 < N), other=0,
                    eviction_policy="evict_first")
    scale = tl.load(scales_ptr + (k0 // group_size) * N + cols, mask=col_mask & (k0 < K), other=0.0)
    zero_words = tl.load(qzeros_ptr + (k0 // group_size) * zeros_stride + cols // 16,
                         mask=col_mask & (k0 < K), other=0)
    x = tl.load(x_ptrs + k0, mask=x_ok & (k0 + x_k < K), other=0.0, eviction_policy="evict_last")
    for k0 in range(pid_k * BLOCK_K, K, step):
        k1 = k0 + step
        next_words = tl.load(words_ptrs + (k1 // 16) * N, mask=(k1 + 16 * word_rows < K) & (cols3 < N), other=0,
                             eviction_policy="evict_first")
        next_scale = tl.load(scales_ptr + (k1 // group_size) * N + cols, mask=col_mask & (k1 < K), other=0.0)
        next_zero_words = tl.load(qzeros_ptr + (k1 // group_size) * zeros_stride + cols // 16,
                                  mask=col_mask & (k1 < K), other=0)
        next_x = tl.load(x_ptrs + k1, mask=x_ok & (k1 + x_k < K), other=0.0, eviction_policy="evict_last")

        bits = (((words << left) >> right) & code_mask) | exponent_bits  # [BK/16, 16, BN]
        x32 = x.to(tl.float32)
        if BLOCK_M == 1:
            # Sums over i stay in each thread's registers; acc keeps one sum per word row until the end.
            weights = bits.to(tl.float32, bitcast=True)
            if not FOLD_OFFSETS:
                weights -= offsets
            dots = tl.reduce(x32[:, :, None] * weights, 1, tl.standard._sum_combine)  # [BK/16, BN]
        else:
            if MANTISSA_BITS == 23:
                weights = bits.to(tl.float32, bitcast=True)
            else:
                weights = bits.to(tl.int16).to(x.dtype, bitcast=True)
            if not FOLD_OFFSETS:
                weights -= offsets.to(weights.dtype)
            # Row 16r + i of the tile is code i of word row r: the row order of W.
            dots = tl.dot(x, tl.reshape(weights, (BLOCK_K, BLOCK_N)), input_precision=DOT_PRECISION)
        zero = ((zero_words >> zero_shifts) & 3).to(tl.float32)
        dots -= zero[None, :] * tl.reduce(x32, 1, tl.standard._sum_combine)[:, None]
        if FOLD_OFFSETS:
            dots -= tl.reduce(x32 * x_offsets, 1, tl.standard._sum_combine)[:, None]
        acc += scale.to(tl.float32)[None, :] * dots
        words, scale, zero_words, x = next_words, next_scale, next_zero_words, next_x

    if BLOCK_M == 1:
        acc = tl.reduce(acc, 0, tl.standard._sum_combine)[None, :]
    mask = (rows[:, None] < M) & col_mask[None, :]
    if split_k == 1:  # decided at compile time: Triton specializes integer arguments equal to 1
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(partial_ptr + pid_k * M * N + rows[:, None] * N + cols[None, :], acc, mask=mask)


@_jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, numel, N, split_k,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr):
    """out = sum over splits of partial (+ bias), cast to out's dtype.

    All splits of a block are loaded at once (one memory round trip, not split_k) and added in an
    order fixed when the kernel compiles, so reruns agree bit for bit.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    splits = tl.arange(0, SPLITS)[:, None]
    parts = tl.load(partial_ptr + splits * numel + offs[None, :], mask=(splits < split_k) & mask[None, :], other=0.0)
    total = tl.reduce(parts, 0, tl.standard._sum_combine)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _gptq2_dequantize_kernel(qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, K, N, group_size, zeros_stride,
                             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W[k, n] = (q - z) * s of a [BLOCK_K, BLOCK_N] tile, in out's dtype. Grid (K / BLOCK_K, N / BLOCK_N);
    BLOCK_K divides G (or there is one group), so the tile's scales and zero points are one row each."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    word_rows = pid_k * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
    fields = tl.arange(0, 16)
    rows = 16 * word_rows[:, None] + fields[None, :]  # [BK/16, 16]: row 16r + i is code i of word row r
    words = tl.load(qweight_ptr + word_rows[:, None] * N + cols[None, :],
                    mask=(16 * word_rows[:, None] < K) & col_mask[None, :], other=0)
    codes = (words[:, None, :] >> (2 * fields)[None, :, None]) & 3  # [BK/16, 16, BN]
    group = (pid_k * BLOCK_K) // group_size
    scale = tl.load(scales_ptr + group * N + cols, mask=col_mask, other=0.0).to(tl.float32)
    zero = (tl.load(qzeros_ptr + group * zeros_stride + cols // 16, mask=col_mask, other=0) >> (2 * (cols % 16))) & 3
    weights = (codes - zero[None, None, :]).to(tl.float32) * scale[None, None, :]
    tl.store(out_ptr + rows[:, :, None] * N + cols[None, None, :], weights.to(out_ptr.dtype.element_ty),
             mask=(rows < K)[:, :, None] & col_mask[None, None, :])


DEQUANTIZE_BLOCK_N = 128
"""Columns of a dequantizing tile: each program reads [BLOCK_K / 16, 128] packed words (4 KB at BLOCK_K 128)
and writes [BLOCK_K, 128] weights."""


def gptq2_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole weight W [K, N] of 2-bit GPTQ buffers (layout in the module docstring), in `dtype` (default
    the scales'): what `Fused2BitLinear` multiplies prefill-sized inputs by. One pass that reads the packed
    buffers once and writes W once; W is (q - z) * s in float32, rounded once to `dtype`."""
    if triton is None:
        raise RuntimeError("gptq2_dequantize needs Triton, which is not installed")
    K, N = qweight.shape[0] * 16, qweight.shape[1]
    group_size = group_size if group_size > 0 else K  # -1: one group over all rows
    block_k = _block_k(K, group_size)
    out = torch.empty(K, N, dtype=dtype or scales.dtype, device=qweight.device)
    grid = (_cdiv(K, block_k), _cdiv(N, DEQUANTIZE_BLOCK_N))
    _gptq2_dequantize_kernel[grid](qweight, qzeros, scales, out, K, N, group_size, qzeros.shape[1],
                                   BLOCK_K=block_k, BLOCK_N=DEQUANTIZE_BLOCK_N)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_k(K: int, group_size: int) -> int:
    """The K tile: 128 rows, or one group when groups are smaller, so a tile never straddles two."""
    return 128 if group_size % 128 == 0 or group_size >= K else group_size


def launch_plan(rows: int, K: int, N: int, group_size: int, *, programs: int = TARGET_PROGRAMS,
                block_n: int | None = None, num_warps: int | None = None) -> dict:
    """Block sizes, split-K, warps, stages and grid of `gptq2_matmul` for `rows` rows of x [rows, K]
    and a [K, N] weight in groups of `group_size` rows: arithmetic on the shape alone.

    Chosen here rather than by triton.autotune, whose timing runs would land inside CUDA graph
    capture. Measured on an H100 inside CUDA graphs, Qwen3-8B shapes at G = 128, 1 and 16 rows:
    - block_k: 128 rows of W (8 qweight rows), or the group when groups are smaller.
    - block_n: 128 columns: each of the 128 threads holds 4 adjacent columns (one 16-byte load per
      word row) of 2 word rows. 256 was no faster once split_k was retuned. Halved down to 64
      while the layer has fewer (K tile, N block) pairs than SMs; k_proj and v_proj (N = 1024)
      still have enough at 128.
    - split_k: as many K splits as bring the grid to about TARGET_PROGRAMS (three per SM) but no
      more than there are K tiles, then as few as keep the same most K tiles per program: 3 to 8
      K tiles per program on the 8B shapes (1 on k_proj and v_proj), prefetched one ahead. About
      one, two or eight programs per SM measured slower.
    - block_m: 1 (the FMA path) or the least tile of 16, 32, 64 rows that holds `rows`.
    - num_warps: WARPS by block_m; 4 at 1 and 16 rows (2 and 8 were 10-40% slower).
    - num_stages 1: Triton's pipeliner stages only loads that feed tl.dot, and staging those made the
      tl.dot path up to 2x slower here.

    The keywords replace these choices (`benchmarks/kernel_plans.py` times the alternatives): `programs`
    the grid to aim for, `block_n` the N block (not halved then), `num_warps`. On one H100 (2026-12-06,
    Qwen3-8B shapes) no point of its grid beat these choices by more than 0.5% for a layer's linears at
    one row, 3.5% at 16 rows.
    """
    block_k = _block_k(K, group_size)
    k_tiles = _cdiv(K, block_k)
    one_row = rows == 1
    if block_n is None:
        block_n = 128
        while block_n > 64 and _cdiv(N, block_n) * k_tiles < H100_SMS:
            block_n //= 2
    block_n = min(block_n, max(16, 1 << (N - 1).bit_length()))  # tiny layers (tests): no wider than N
    n_blocks = _cdiv(N, block_n)
    split_k = max(1, min(k_tiles, programs // n_blocks))
    split_k = _cdiv(k_tiles, _cdiv(k_tiles, split_k))
    block_m = 1 if one_row else max(16, 1 << (rows - 1).bit_length())  # rows <= MAX_ROWS, a power of two
    return {"block_m": block_m, "block_n": block_n, "block_k": block_k,
            "split_k": split_k, "num_warps": num_warps or WARPS.get(block_m, 4), "num_stages": 1,
            "grid": (n_blocks, split_k)}


def gptq2_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W [K, N] (+ bias) for 2-bit GPTQ buffers (layout in the module docstring), in x's dtype.

    For at most MAX_ROWS rows of x. No host sync and no branch on tensor values, so a CUDA graph
    can capture it (after one eager call per shape has compiled the kernels). Split-K partial sums
    are added in a fixed order rather than with atomics, so the result does not vary from run to
    run (greedy traces stay reproducible). float32 x multiplies in full float32 (no TF32).
    """
    if triton is None:
        raise RuntimeError("gptq2_matmul needs Triton, which is not installed")
    K, N = x.shape[-1], qweight.shape[1]
    rows = x.numel() // K if K else 0
    if rows > MAX_ROWS:
        raise ValueError(f"gptq2_matmul takes at most {MAX_ROWS} rows of x, got {rows} (x of shape "
                         f"{tuple(x.shape)}); multiply by gptq2_dequantize's weight for prefill")
    if _block_k(K, group_size) not in (16, 32, 64, 128):
        raise ValueError(f"gptq2_matmul: group_size must be 16, 32, 64, a multiple of 128 or at "
                         f"least in_features ({K}), got {group_size}")
    groups = -(-K // group_size)
    expected = {"qweight": (-(-K // 16), N), "qzeros": (groups, -(-N // 16)), "scales": (groups, N)}
    for name, tensor in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"gptq2_matmul: {name} must have shape {expected[name]} for x [..., {K}], "
                             f"{N} outputs and group_size {group_size}, got {tuple(tensor.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gptq2_matmul: x must be float16, bfloat16 or float32, got {x.dtype}")
    if not x.device == qweight.device == qzeros.device == scales.device:
        raise ValueError(f"gptq2_matmul: x is on {x.device} but the GPTQ buffers are on "
                         f"{qweight.device}, {qzeros.device}, {scales.device}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"gptq2_matmul: qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")

    if SPLIT_SUMS not in SPLIT_SUMS_PATHS:
        raise ValueError(f"kernels.SPLIT_SUMS must be one of {', '.join(SPLIT_SUMS_PATHS)}, got {SPLIT_SUMS!r}")
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    x2d = x.reshape(rows, K).contiguous()
    plan = launch_plan(rows, K, N, group_size)
    partial = _launch(x2d, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), bias, out, group_size, plan)
    if partial is None:
        return out
    total = partial.sum(0)
    if bias is not None:
        total = total + bias.float()
    return total.to(x.dtype).reshape(out.shape)


def _launch(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
            bias: torch.Tensor | None, out: torch.Tensor, group_size: int, plan: dict) -> torch.Tensor | None:
    """Runs `plan` for x [rows, K] into out [..., N] (checked and contiguous inputs). Returns None, or with
    split-K sums left to torch (SPLIT_SUMS), the float32 partial sums [split_k, rows, N] for the caller to add."""
    rows, K = x.shape
    N = qweight.shape[1]
    split_k = plan["split_k"]
    # One row sums on the FMA units in float32; tl.dot takes the weight tile in x's dtype.
    mantissa_bits, exponent_bias = _FLOAT_BITS[torch.float32 if plan["block_m"] == 1 else x.dtype]
    # float32 x: exact float32 throughout (offsets off every weight, no TF32), for tests and float32
    # models; 16-bit x: the cheaper folded offsets, far more accurate than x's own rounding.
    exact = x.dtype == torch.float32
    partial = out if split_k == 1 else torch.empty(split_k, rows, N, dtype=torch.float32, device=x.device)
    _gptq2_matmul_kernel[plan["grid"]](
        x, qweight, qzeros, scales, bias if bias is not None else out, out, partial,
        rows, N, K, group_size, qzeros.shape[1], split_k, (exponent_bias + 6) << mantissa_bits,
        BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"], BLOCK_K=plan["block_k"], MANTISSA_BITS=mantissa_bits,
        DOT_PRECISION="ieee" if exact else "tf32", FOLD_OFFSETS=not exact, HAS_BIAS=bias is not None,
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    if split_k == 1:
        return None
    if SPLIT_SUMS == "torch" or SPLIT_SUMS == "auto" and torch.compiler.is_compiling():
        return partial
    numel, splits = rows * N, triton.next_power_of_2(split_k)
    block = max(32, 4096 // splits)  # a [splits, block] tile of 16 KB or less per program
    _sum_splits_kernel[(triton.cdiv(numel, block),)](
        partial, bias if bias is not None else partial, out, numel, N, split_k,
        HAS_BIAS=bias is not None, BLOCK=block, SPLITS=splits,
    )
    return None


def _fusable_gptq_types() -> tuple[type, ...]:
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.nn_modules.qlinear.tritonv2 import TritonV2Linear

    return TorchLinear, TritonV2Linear


class Fused2BitLinear(nn.Module):
    """A GPTQModel 2-bit linear whose decoding calls (at most MAX_DECODE_ROWS rows, MAX_ROWS at a time)
    run `gptq2_matmul` on its packed buffers; bigger calls (prefill) multiply by the whole dequantized
    weight (`PREFILL`).

    The GPTQ module stays a submodule (`.gptq`), so `.to()` moves the buffers both paths read and
    they appear in the state dict under `<name>.gptq.`.
    """

    def __init__(self, gptq: nn.Module):
        super().__init__()
        self.gptq = gptq
        self.in_features = gptq.in_features
        self.out_features = gptq.out_features

    @classmethod
    def from_gptq(cls, module: nn.Module) -> Fused2BitLinear:
        """Wrap a 2-bit `TorchLinear` or `TritonV2Linear` with groups in row order (desc_act False)."""
        name = type(module).__name__
        if type(module) not in _fusable_gptq_types():
            raise ValueError(f"Fused2BitLinear: expected a GPTQModel TorchLinear or TritonV2Linear, got {name}")
        if module.bits != 2:
            raise ValueError(f"Fused2BitLinear: {name} has {module.bits}-bit weights; only 2-bit is fused")
        if module.desc_act:
            raise ValueError(f"Fused2BitLinear: {name} was quantized with desc_act=True (rows permuted "
                             "by g_idx); the fused kernel needs group = row // group_size")
        if module.pack_dtype != torch.int32:
            raise ValueError(f"Fused2BitLinear: {name} packs into {module.pack_dtype}; only int32 is supported")
        if module.adapter is not None or module.online_full_had or module.online_partial_had:
            raise ValueError(f"Fused2BitLinear: {name} has a LoRA adapter or an online Hadamard rotation, "
                             "which the fused kernel does not apply")
        rows = torch.arange(module.in_features, device=module.g_idx.device)
        if not torch.equal(module.g_idx.long(), rows // module.group_size):
            raise ValueError(f"Fused2BitLinear: {name}.g_idx is not row // group_size "
                             f"({module.group_size}) although desc_act is False")
        return cls(module)

    @property
    def weight(self):
        """GPTQModel's shape/dtype/device stand-in for code that inspects `linear.weight`."""
        return self.gptq.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        gptq = self.gptq
        if rows > MAX_DECODE_ROWS:
            if PREFILL == "gptqmodel":
                return gptq(x)
            if PREFILL != "dequantize":
                raise ValueError(f"kernels.PREFILL must be one of {', '.join(PREFILL_PATHS)}, got {PREFILL!r}")
            weight = gptq2_dequantize(gptq.qweight, gptq.qzeros, gptq.scales, gptq.group_size, x.dtype)
            out = x.reshape(rows, x.shape[-1]) @ weight
            if gptq.bias is not None:
                out += gptq.bias.to(out.dtype)
            return out.reshape(*x.shape[:-1], self.out_features)
        if rows <= MAX_ROWS:
            return gptq2_matmul(x, gptq.qweight, gptq.qzeros, gptq.scales, gptq.group_size, bias=gptq.bias)
        flat = x.reshape(rows, x.shape[-1])
        parts = [gptq2_matmul(flat[start:start + MAX_ROWS], gptq.qweight, gptq.qzeros, gptq.scales, gptq.group_size,
                              bias=gptq.bias) for start in range(0, rows, MAX_ROWS)]
        return torch.cat(parts).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.gptq.group_size}"


class Grouped2BitLinear(nn.Module):
    """Several Fused2BitLinear of one input (a layer's q, k and v projections, or gate and up) as one
    fused-kernel call: their packed buffers concatenated along N, the product split back.

    One launch (and one split-K sum) instead of one per member: at one row the small projections
    (k_proj and v_proj of Qwen3-8B read 1 MB each) cost their launches, not their bytes. The
    concatenated buffers are a copy: the members keep theirs for prefill. Every member needs the
    same in_features and group size, a multiple of 16 outputs (a qzeros word packs 16 columns) and a
    bias either in all members or in none.
    """

    def __init__(self, members: list[Fused2BitLinear]):
        super().__init__()
        if not members:
            raise ValueError("Grouped2BitLinear: no members to group")
        for member in members:
            if not isinstance(member, Fused2BitLinear):
                raise ValueError(f"Grouped2BitLinear: expected Fused2BitLinear members, got {type(member).__name__}")
        first = members[0].gptq
        for member in members:
            gptq = member.gptq
            if (gptq.in_features, gptq.group_size) != (first.in_features, first.group_size):
                raise ValueError(f"Grouped2BitLinear: members differ in in_features or group_size: "
                                 f"{(first.in_features, first.group_size)} and {(gptq.in_features, gptq.group_size)}")
            if gptq.out_features % 16:
                raise ValueError(f"Grouped2BitLinear: out_features must be a multiple of 16, got {gptq.out_features}")
            if (gptq.bias is None) != (first.bias is None):
                raise ValueError("Grouped2BitLinear: some members have a bias and some do not")
        self.in_features, self.group_size = first.in_features, first.group_size
        self.splits = [member.out_features for member in members]
        for name in ("qweight", "qzeros", "scales"):
            self.register_buffer(name, torch.cat([getattr(m.gptq, name) for m in members], 1).contiguous())
        self.register_buffer("bias", None if first.bias is None else torch.cat([m.gptq.bias for m in members]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each member's product for x [..., in_features] with at most MAX_ROWS rows, in member order."""
        out = gptq2_matmul(x, self.qweight, self.qzeros, self.scales, self.group_size, bias=self.bias)
        return out.split(self.splits, -1)


class _GroupRun:
    """What the first member of a group ran last: its input and every member's part (not a module, so
    the parts are no state of the model)."""

    def __init__(self):
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()


class GroupedLinear(nn.Module):
    """Several bf16/fp16 nn.Linear of one input (a layer's q, k and v projections, or gate and up) as one
    matmul: one weight [sum of out_features, in_features], the members' weights made views of its rows, so
    grouping takes no memory. Group a model after moving it to its device (`.to()` would copy the views
    apart). Every member needs the same in_features and dtype and a bias either in all or in none."""

    def __init__(self, members: list[nn.Linear]):
        super().__init__()
        if not members:
            raise ValueError("GroupedLinear: no members to group")
        for member in members:
            if type(member) is not nn.Linear:
                raise ValueError(f"GroupedLinear: expected nn.Linear members, got {type(member).__name__}")
        first = members[0]
        for member in members:
            if (member.in_features, member.weight.dtype) != (first.in_features, first.weight.dtype):
                raise ValueError(f"GroupedLinear: members differ in in_features or dtype: {first.in_features}, "
                                 f"{first.weight.dtype} and {member.in_features}, {member.weight.dtype}")
            if (member.bias is None) != (first.bias is None):
                raise ValueError("GroupedLinear: some members have a bias and some do not")
        self.in_features = first.in_features
        self.splits = [member.out_features for member in members]
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in members]), requires_grad=False)
        self.bias = None if first.bias is None else nn.Parameter(torch.cat([m.bias.detach() for m in members]),
                                                                 requires_grad=False)
        for name in ("weight",) + (() if self.bias is None else ("bias",)):
            for member, part in zip(members, getattr(self, name).split(self.splits)):
                setattr(member, name, nn.Parameter(part, requires_grad=False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each member's product for x [..., in_features], in member order."""
        return nn.functional.linear(x, self.weight, self.bias).split(self.splits, -1)


class GroupedMember(nn.Module):
    """A linear in its layer's place, answered from its group's one call (Grouped2BitLinear or GroupedLinear).

    The first member of a group (`index` 0, which holds the group) runs the whole group for its input and
    keeps the parts; a later member called with that same input tensor returns its part, as Qwen3's
    attention calls q, k and v (and its MLP gate and up) on one hidden state; the last one lets the parts
    go. Any other call runs the member's own linear, and so does every call of more than `max_rows` rows
    (a 2-bit group's MAX_ROWS: prefill; None for bf16 groups, which take any rows).
    """

    def __init__(self, own: nn.Module, index: int, run: _GroupRun, group: nn.Module | None = None, *,
                 last: bool = False, max_rows: int | None = None):
        super().__init__()
        self.own = own
        self.index = index
        self.run = run
        self.group = group  # the first member only: registered once, so .to() moves its buffers once
        self.last = last
        self.max_rows = max_rows
        self.in_features, self.out_features = own.in_features, own.out_features

    @property
    def weight(self):
        return self.own.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if self.group is not None:
            if self.max_rows is not None and rows > self.max_rows:
                self.run.input, self.run.parts = None, ()
                return self.own(x)
            self.run.input, self.run.parts = x, self.group(x)
            return self.run.parts[0]
        if self.run.input is x:
            part = self.run.parts[self.index]
            if self.last:
                self.run.input, self.run.parts = None, ()
            return part
        return self.own(x)


_PROJECTION_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def _projection_sites(model: nn.Module):
    """(module, names of its projections that one group may hold) for every decoder layer's attention and MLP."""
    for layer in getattr(getattr(model, "model", model), "layers", []):
        for parent_name, names in _PROJECTION_GROUPS:
            yield getattr(layer, parent_name, None), names


def _group_projections(model: nn.Module, kind: type, make_group, max_rows: int | None) -> int:
    groups = 0
    for parent, names in _projection_sites(model):
        members = [getattr(parent, name, None) for name in names]
        if not all(type(member) is kind for member in members):
            continue
        grouped, run = make_group(members), _GroupRun()
        for index, (name, member) in enumerate(zip(names, members)):
            setattr(parent, name, GroupedMember(member, index, run, grouped if index == 0 else None,
                                                last=index == len(names) - 1, max_rows=max_rows))
        groups += 1
    return groups


def group_2bit_projections(model: nn.Module) -> int:
    """In every decoder layer whose projections are Fused2BitLinear, q, k and v become one kernel call and
    gate and up another (GroupedMember); returns how many groups. The grouped buffers are a copy of
    the members' (which prefill still reads): about 0.7x more 2-bit weight memory."""
    return _group_projections(model, Fused2BitLinear, Grouped2BitLinear, MAX_ROWS)


def group_linear_projections(model: nn.Module) -> int:
    """The same for a bf16/fp16 model's nn.Linear projections (GroupedLinear, for any number of rows); returns
    how many groups. No memory is added: the members' weights become views of the group's."""
    return _group_projections(model, nn.Linear, GroupedLinear, None)


def ungroup_projections(model: nn.Module) -> int:
    """Puts every grouped projection's own linear back in its place; returns how many. A bf16 member keeps
    its weight as a view of the group's rows."""
    restored = 0
    for parent, names in _projection_sites(model):
        for name in names:
            member = getattr(parent, name, None)
            if isinstance(member, GroupedMember):
                setattr(parent, name, member.own)
                restored += 1
    return restored


def fuse_2bit_linears(model: nn.Module) -> int:
    """Swap every 2-bit TorchLinear / TritonV2Linear in `model` for a Fused2BitLinear; returns how many.

    Modules of other widths stay as they are; a 2-bit one the kernel cannot run raises ValueError.
    """
    fusable = _fusable_gptq_types()
    fused = {name: Fused2BitLinear.from_gptq(module) for name, module in model.named_modules()
             if name and type(module) in fusable and module.bits == 2}
    for name, module in fused.items():  # swapped only once all of them passed from_gptq's checks
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, module)
    return len(fused)
