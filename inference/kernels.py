"""A fused 2-bit GPTQ matmul for decoding: activations times packed weights, never unpacking the
whole weight.

GPTQModel's 2-bit backends (`TorchLinear`, `TritonV2Linear`) dequantize the full [K, N] weight on
every call and then run a dense matmul, so one decoded token reads the packed weight, writes and
reads a 16-bit copy of it, and ends up slower than plain bf16. Here each Triton program unpacks
only the tile it multiplies, in registers, so a decoding step reads 2 bits per weight plus one
fp16 scale and one 2-bit zero point per group of G weights: about 7x fewer bytes than bf16 at
G = 64, 7.5x at G = 128. With at most 16 rows (one tl.dot tile, masked) there is too little work
per output column for one program per N block to keep HBM busy, so the K dimension is split too
(split-K, about TARGET_PROGRAMS programs in all) and a second small kernel adds the fp32 partial
sums in a fixed order.

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
"""

from __future__ import annotations

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: this module imports, gptq2_matmul says why not
    triton = None

MAX_ROWS = 16
"""Most activation rows the fused kernel takes: one tl.dot tile of BLOCK_M rows (decoding batches)."""

BLOCK_N = 64
TARGET_PROGRAMS = 512
"""Programs to aim for with split-K: about four per SM of an H100 (132 SMs), enough loads in
flight to keep HBM busy when one layer's packed weight is only a few MB."""


def _jit(kernel):
    return triton.jit(kernel) if triton is not None else kernel


@_jit
def _gptq2_matmul_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, partial_ptr,
    M, N, K, group_size, zeros_stride, split_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partial[pid_k, :M, n block] = sum over this program's K tiles of x[:, tile] @ W[tile, n block].

    Grid (N / BLOCK_N, split_k): program (pid_n, pid_k) takes K tiles pid_k, pid_k + split_k, ...
    BLOCK_K divides G (or there is one group), so each tile needs one row of scales and zeros.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    zero_shifts = 2 * (cols % 16)

    # tl.full, not tl.zeros: builtins only, since Triton's @jit-defined helpers run in its CPU
    # interpreter only if TRITON_INTERPRET was set before triton was first imported (the tests)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, split_k * BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        # Every N block reads x; each packed word is needed by this program only: cache hints say so.
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :],
                    mask=(rows[:, None] < M) & k_mask[None, :], other=0.0, eviction_policy="evict_last")
        # Sixteen rows share each word: the repeated addresses are served from cache, so DRAM sees
        # every packed word once.
        words = tl.load(qweight_ptr + (ks // 16)[:, None] * N + cols[None, :],
                        mask=k_mask[:, None] & col_mask[None, :], other=0, eviction_policy="evict_first")
        codes = (words >> (2 * (ks % 16))[:, None]) & 3

        group = k0 // group_size
        scale = tl.load(scales_ptr + group * N + cols, mask=col_mask, other=0.0)
        zero_words = tl.load(qzeros_ptr + group * zeros_stride + cols // 16, mask=col_mask, other=0)
        zero = (zero_words >> zero_shifts) & 3

        # In the scales' dtype, then x's, rounding as TorchLinear.dequantize_weight does.
        weight = ((codes - zero[None, :]).to(scale.dtype) * scale[None, :]).to(x.dtype)
        acc += tl.dot(x, weight)

    out = partial_ptr + pid_k * M * N + rows[:, None] * N + cols[None, :]
    tl.store(out, acc, mask=(rows[:, None] < M) & col_mask[None, :])


@_jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, numel, N, split_k,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum over splits of partial (+ bias), cast to out's dtype; a fixed order, so reruns agree bit for bit."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    total = tl.full((BLOCK,), 0.0, dtype=tl.float32)
    for split in range(split_k):
        total += tl.load(partial_ptr + split * numel + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


def gptq2_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W [K, N] (+ bias) for 2-bit GPTQ buffers (layout in the module docstring), in x's dtype.

    For at most MAX_ROWS rows of x. No host sync and no branch on tensor values, so a CUDA graph
    can capture it (after one eager call per shape has compiled the kernels). Split-K partial sums
    are added in a fixed order rather than with atomics, so the result does not vary from run to
    run (greedy traces stay reproducible). float32 x multiplies in TF32 on the GPU.
    """
    if triton is None:
        raise RuntimeError("gptq2_matmul needs Triton, which is not installed")
    K, N = x.shape[-1], qweight.shape[1]
    rows = x.numel() // K if K else 0
    if rows > MAX_ROWS:
        raise ValueError(f"gptq2_matmul takes at most {MAX_ROWS} rows of x, got {rows} (x of shape "
                         f"{tuple(x.shape)}); use the GPTQ module's own forward for prefill")
    block_k = 128 if group_size % 128 == 0 or group_size >= K else group_size
    if block_k not in (16, 32, 64, 128):
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

    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    x2d = x.reshape(rows, K).contiguous()
    n_blocks = triton.cdiv(N, BLOCK_N)
    split_k = max(1, min(triton.cdiv(K, block_k), TARGET_PROGRAMS // n_blocks))
    partial = torch.empty(split_k, rows, N, dtype=torch.float32, device=x.device)
    _gptq2_matmul_kernel[(n_blocks, split_k)](
        x2d, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), partial,
        rows, N, K, group_size, qzeros.shape[1], split_k,
        BLOCK_M=MAX_ROWS, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
    )
    numel, block = rows * N, 1024
    _sum_splits_kernel[(triton.cdiv(numel, block),)](
        partial, bias if bias is not None else partial, out, numel, N, split_k,
        HAS_BIAS=bias is not None, BLOCK=block,
    )
    return out


def _fusable_gptq_types() -> tuple[type, ...]:
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.nn_modules.qlinear.tritonv2 import TritonV2Linear

    return TorchLinear, TritonV2Linear


class Fused2BitLinear(nn.Module):
    """A GPTQModel 2-bit linear whose decoding calls (at most MAX_ROWS rows) run `gptq2_matmul` on
    its packed buffers; bigger calls (prefill) go to the module's own forward.

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
        if x.numel() > MAX_ROWS * x.shape[-1]:
            return self.gptq(x)
        gptq = self.gptq
        return gptq2_matmul(x, gptq.qweight, gptq.qzeros, gptq.scales, gptq.group_size, bias=gptq.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.gptq.group_size}"


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
