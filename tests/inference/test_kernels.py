"""The fused 2-bit GPTQ matmul against GPTQModel's own dequantization, run on the CPU by Triton's interpreter."""

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
pytest.importorskip("gptqmodel")

from gptqmodel.nn_modules.qlinear.torch import TorchLinear  # noqa: E402


@pytest.fixture(scope="module")
def kernels(interpreted_copy):
    """inference.decoding.kernels with its kernels in Triton's interpreter (conftest.interpreted_copy)."""
    with interpreted_copy("inference.decoding.kernels", "_gptq2_matmul_kernel") as module:
        yield module


def random_2bit_linear(in_features: int, out_features: int, group_size: int, bias: bool = False,
                       desc_act: bool = False, seed: int = 0) -> TorchLinear:
    """A TorchLinear built as GPTQModel builds one for loading, filled with random packed codes."""
    generator = torch.Generator().manual_seed(seed)
    module = TorchLinear(bits=2, group_size=group_size, sym=True, desc_act=desc_act,
                         in_features=in_features, out_features=out_features, bias=bias)
    for packed in (module.qweight, module.qzeros):
        packed.copy_(torch.randint(-2**31, 2**31, packed.shape, generator=generator, dtype=torch.int64))
    # Multiples of 2**-14 below 2**-5: 9 significant bits, so (q - z) * s is exact in fp16 and the
    # reference W (TorchLinear rounds it to fp16) is the exact W that the kernel multiplies by.
    module.scales.copy_(torch.randint(80, 400, module.scales.shape, generator=generator) * 2.0**-14)
    if bias:
        module.bias.copy_(torch.randn(out_features, generator=generator))
    module.post_init()
    return module.eval()


def dequantized(module: TorchLinear) -> torch.Tensor:
    # The class method, not the instance's torch.compile wrapper that post_init installs: same math,
    # no seconds-long inductor compile on the CPU.
    return TorchLinear.dequantize_weight(module).float()


def test_torch_linear_uses_v2_zero_points(kernels):
    """Codes 2 with stored zero point 1 and scale 1 dequantize to 1 (v2: q - z), not 0 (v1: q - (z + 1))."""
    module = random_2bit_linear(64, 32, group_size=32)
    module.qweight.fill_(int.from_bytes(b"\xaa" * 4, "little", signed=True))  # every code 0b10
    module.qzeros.fill_(int.from_bytes(b"\x55" * 4, "little", signed=True))  # every zero point 0b01
    module.scales.fill_(1.0)
    x = torch.randn(2, 64)

    assert torch.equal(dequantized(module), torch.ones(64, 32))
    fused = kernels.gptq2_matmul(x, module.qweight, module.qzeros, module.scales, module.group_size)
    torch.testing.assert_close(fused, x.sum(-1, keepdim=True).expand(2, 32))


def split_k_ways(kernels, monkeypatch, split_k: int) -> None:
    """Makes gptq2_matmul split K `split_k` ways, whatever launch_plan would choose."""
    planned = kernels.launch_plan

    def plan(rows, K, N, group_size):
        chosen = planned(rows, K, N, group_size)
        return {**chosen, "split_k": split_k, "grid": (chosen["grid"][0], split_k)}

    monkeypatch.setattr(kernels, "launch_plan", plan)


class NotLaunched:
    def __getitem__(self, grid):
        pytest.fail("the split-K sum kernel ran although there was one split")


shapes = pytest.mark.parametrize("in_features, out_features, group_size", [
    (256, 256, 64),  # the shipped configs' g64: K tiles of one group each, split-K over 4 tiles
    (512, 160, 128),  # out_features not a multiple of the N block
    (208, 64, -1),  # one group over all rows; K not a multiple of the K tile
])


@shapes
@pytest.mark.parametrize("rows", [1, 3, 16, 20, 64])  # 1: the FMA path; 3, 16: a 16-row tl.dot tile; 20: 32; 64
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gptq2_matmul_matches_dequantized_weight(kernels, in_features, out_features, group_size, rows, dtype):
    module = random_2bit_linear(in_features, out_features, group_size)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)).to(dtype)

    fused = kernels.gptq2_matmul(x, module.qweight, module.qzeros, module.scales, module.group_size)

    assert fused.shape == (rows, out_features) and fused.dtype == dtype
    expected = x.float() @ dequantized(module)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused.float(), expected, rtol=tolerance, atol=tolerance)


@shapes
def test_gptq2_matmul_one_row_in_bfloat16(kernels, in_features, out_features, group_size):
    """bf16 on the one-row path only: the interpreter's tl.dot multiplies bf16 bit patterns as
    integers, so the tl.dot path meets bf16 on a GPU alone. The interpreter also truncates float32 to
    bf16 rather than rounding it, hence one bf16 ulp of tolerance."""
    module = random_2bit_linear(in_features, out_features, group_size)
    x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    fused = kernels.gptq2_matmul(x, module.qweight, module.qzeros, module.scales, module.group_size)

    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), x.float() @ dequantized(module), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("split_k, sums", [(1, "kernel"), (3, "kernel"), (3, "auto"), (3, "torch")])
def test_gptq2_matmul_covers_every_k_tile_and_adds_bias_whatever_the_split(kernels, monkeypatch, rows, split_k, sums):
    """One split walking all 8 K tiles and writing the output itself, bias included, or 3 splits
    taking 3, 3 and 2 of them, which the second kernel adds up with the bias (or torch does: SPLIT_SUMS
    "torch"; "auto" leaves them to torch only while torch.compile traces, so here to the kernel)."""
    module = random_2bit_linear(512, 160, group_size=64, bias=True)
    split_k_ways(kernels, monkeypatch, split_k)
    monkeypatch.setattr(kernels, "SPLIT_SUMS", sums)
    if split_k == 1 or sums == "torch":
        monkeypatch.setattr(kernels, "_sum_splits_kernel", NotLaunched())
    x = torch.randn(rows, 512)

    fused = kernels.gptq2_matmul(x, module.qweight, module.qzeros, module.scales, module.group_size,
                                 bias=module.bias)

    torch.testing.assert_close(fused, x @ dequantized(module) + module.bias.float(), rtol=1e-4, atol=1e-4)


def test_gptq2_matmul_refuses_an_unknown_split_sums_path(kernels, monkeypatch):
    module = random_2bit_linear(128, 32, group_size=64)
    monkeypatch.setattr(kernels, "SPLIT_SUMS", "atomic")
    with pytest.raises(ValueError, match="SPLIT_SUMS must be one of kernel, torch, auto, got 'atomic'"):
        kernels.gptq2_matmul(torch.randn(1, 128), module.qweight, module.qzeros, module.scales, module.group_size)


@pytest.mark.parametrize("shape", [(2, 8, 128), (1, 1, 128)])
@pytest.mark.parametrize("sums", ["kernel", "torch"])
def test_gptq2_matmul_keeps_leading_dims_and_adds_bias(kernels, monkeypatch, shape, sums):
    module = random_2bit_linear(128, 64, group_size=32, bias=True)
    split_k_ways(kernels, monkeypatch, 2)
    monkeypatch.setattr(kernels, "SPLIT_SUMS", sums)
    x = torch.randn(shape)

    fused = kernels.gptq2_matmul(x, module.qweight, module.qzeros, module.scales, module.group_size,
                                 bias=module.bias)

    expected = x @ dequantized(module) + module.bias.float()
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("in_features, out_features", [(4096, 4096), (4096, 1024), (4096, 12288), (12288, 4096)])
@pytest.mark.parametrize("rows", [1, 16, 17, 64])
def test_launch_plan_fills_an_h100_for_qwen3_8b_linears(kernels, in_features, out_features, rows):
    """q/o_proj, k/v_proj, gate/up_proj and down_proj of Qwen3-8B at g128: one wave of programs
    at least, no more than the target, every K tile and column covered."""
    plan = kernels.launch_plan(rows, in_features, out_features, 128)

    n_blocks, split_k = plan["grid"]
    assert 132 <= n_blocks * split_k <= kernels.TARGET_PROGRAMS
    assert plan["block_m"] == {1: 1, 16: 16, 17: 32, 64: 64}[rows] and plan["block_k"] == 128
    assert n_blocks == -(-out_features // plan["block_n"]) and split_k == plan["split_k"] <= in_features // 128
    assert plan["num_warps"] > 0 and plan["num_stages"] > 0


def test_gptq2_matmul_rejects_more_than_64_rows(kernels):
    module = random_2bit_linear(64, 32, group_size=32)
    with pytest.raises(ValueError, match="at most 64 rows"):
        kernels.gptq2_matmul(torch.randn(65, 64), module.qweight, module.qzeros, module.scales, 32)


@pytest.mark.parametrize("rows, tile", [(2, 16), (16, 16), (17, 32), (33, 64), (64, 64)])
def test_launch_plan_takes_the_least_tile_that_holds_the_rows(kernels, rows, tile):
    """One call reads the weight once for the whole batch; with MAX_ROWS at 16 (the benchmarks' earlier
    kernel) every tile is 16 rows."""
    assert kernels.launch_plan(rows, 4096, 4096, 128)["block_m"] == tile
    assert kernels.launch_plan(rows, 4096, 4096, 128)["num_warps"] == kernels.WARPS[tile]


def test_fused_linear_runs_kernel_for_decoding_and_module_forward_for_gptqmodel_prefill(kernels, monkeypatch):
    """PREFILL gptqmodel: a call of more than MAX_DECODE_ROWS rows goes to the GPTQ module's own forward."""
    monkeypatch.setattr(kernels, "PREFILL", "gptqmodel")
    module = random_2bit_linear(128, 64, group_size=64, bias=True)
    fused = kernels.Fused2BitLinear.from_gptq(module)
    decode, prefill = torch.randn(1, 4, 128), torch.randn(1, 65, 128)
    expected_prefill = prefill @ dequantized(module) + module.bias.float()
    monkeypatch.setattr(module, "dequantize_weight", lambda num_itr=1: dequantized(module))

    torch.testing.assert_close(fused(decode), decode @ dequantized(module) + module.bias.float(),
                               rtol=1e-4, atol=1e-4)
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "gptq2_matmul", lambda *args, **kwargs: pytest.fail("prefill used the kernel"))
        patch.setattr(kernels, "gptq2_dequantize", lambda *args, **kwargs: pytest.fail("prefill used our dequantization"))
        torch.testing.assert_close(fused(prefill), expected_prefill, rtol=1e-4, atol=1e-4)


@shapes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gptq2_dequantize_gives_gptqmodels_weight(kernels, in_features, out_features, group_size, dtype):
    module = random_2bit_linear(in_features, out_features, group_size)

    weight = kernels.gptq2_dequantize(module.qweight, module.qzeros, module.scales, module.group_size, dtype)

    assert weight.shape == (in_features, out_features) and weight.dtype == dtype
    assert torch.equal(weight.float(), dequantized(module))  # (q - z) * s is exact in fp16 for these scales
    if group_size == -1:  # the module holds one group as in_features; -1 itself means the same
        raw = kernels.gptq2_dequantize(module.qweight, module.qzeros, module.scales, -1, dtype)
        assert torch.equal(raw, weight)


def test_fused_linear_prefill_through_its_own_dequantization(kernels, monkeypatch):
    """PREFILL dequantize (the default): a call of more than MAX_DECODE_ROWS rows multiplies by gptq2_dequantize's
    W, bias added, without the GPTQ module's forward; an unknown PREFILL is refused by name."""
    assert kernels.PREFILL == "dequantize"
    module = random_2bit_linear(128, 64, group_size=64, bias=True)
    fused = kernels.Fused2BitLinear.from_gptq(module)
    prefill = torch.randn(2, 40, 128)  # 80 rows
    monkeypatch.setattr(module, "forward", lambda x: pytest.fail("prefill used the GPTQ module's forward"))

    out = fused(prefill)

    assert out.shape == (2, 40, 64)
    torch.testing.assert_close(out, prefill @ dequantized(module) + module.bias.float(), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(kernels, "PREFILL", "fast")
    with pytest.raises(ValueError, match="kernels.PREFILL must be one of gptqmodel, dequantize"):
        fused(prefill)


@pytest.mark.parametrize("max_rows", [64, 16])
@pytest.mark.parametrize("shape", [(17, 128), (2, 20, 128), (64, 128)])
def test_fused_linear_runs_a_decoding_batch_of_up_to_64_rows_in_calls_of_max_rows(kernels, monkeypatch, shape, max_rows):
    monkeypatch.setattr(kernels, "MAX_ROWS", max_rows)
    module = random_2bit_linear(128, 48, group_size=64, bias=True)
    fused = kernels.Fused2BitLinear.from_gptq(module)
    x = torch.randn(*shape)
    calls = []
    real = kernels.gptq2_matmul
    monkeypatch.setattr(kernels, "gptq2_matmul", lambda x, *args, **kwargs: calls.append(x.numel() // x.shape[-1]) or real(x, *args, **kwargs))
    monkeypatch.setattr(module, "forward", lambda x: pytest.fail("a decoding batch used the dequantizing forward"))
    out = fused(x)
    rows = x.numel() // 128
    assert out.shape == (*shape[:-1], 48)
    assert calls == [max_rows] * (rows // max_rows) + ([rows % max_rows] if rows % max_rows else [])
    torch.testing.assert_close(out, x @ dequantized(module) + module.bias.float(), rtol=1e-4, atol=1e-4)


def test_from_gptq_refuses_desc_act(kernels):
    module = random_2bit_linear(64, 32, group_size=32, desc_act=True)
    with pytest.raises(ValueError, match="desc_act"):
        kernels.Fused2BitLinear.from_gptq(module)


def test_fuse_2bit_linears_swaps_only_2bit_gptq_linears(kernels):
    four_bit = TorchLinear(bits=4, group_size=32, sym=True, desc_act=False, in_features=64, out_features=64)
    first, second = random_2bit_linear(64, 64, 32, seed=1), random_2bit_linear(64, 64, 32, seed=2)
    model = nn.Sequential(first, nn.Sequential(second), four_bit, nn.Linear(64, 64))
    x = torch.randn(3, 64)
    expected = x @ dequantized(first) @ dequantized(second)

    assert kernels.fuse_2bit_linears(model) == 2
    assert [type(m).__name__ for m in (model[0], model[1][0], model[2], model[3])] == [
        "Fused2BitLinear", "Fused2BitLinear", "TorchLinear", "Linear"]
    torch.testing.assert_close(model[1](model[0](x)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 5])
def test_grouped_linear_gives_each_members_product_in_one_kernel_call(kernels, monkeypatch, rows):
    """q, k, v of different widths (as in Qwen3: k and v narrower than q), each with its own codes."""
    members = [kernels.Fused2BitLinear.from_gptq(random_2bit_linear(128, n, group_size=64, bias=True, seed=seed))
               for seed, n in enumerate((96, 32, 48))]
    grouped = kernels.Grouped2BitLinear(members)
    x = torch.randn(rows, 128)
    calls = []
    real = kernels.gptq2_matmul
    monkeypatch.setattr(kernels, "gptq2_matmul", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    parts = grouped(x)

    assert len(calls) == 1
    assert [tuple(part.shape) for part in parts] == [(rows, 96), (rows, 32), (rows, 48)]
    for part, member in zip(parts, members):
        torch.testing.assert_close(part, x @ dequantized(member.gptq) + member.gptq.bias.float(), rtol=1e-4, atol=1e-4)


def test_grouped_linear_refuses_members_it_cannot_concatenate(kernels):
    def fused(in_features, out_features, group_size=64, bias=False):
        return kernels.Fused2BitLinear.from_gptq(random_2bit_linear(in_features, out_features, group_size, bias=bias))

    with pytest.raises(ValueError, match="in_features or group_size"):
        kernels.Grouped2BitLinear([fused(128, 32), fused(64, 32)])
    with pytest.raises(ValueError, match="in_features or group_size"):
        kernels.Grouped2BitLinear([fused(128, 32), fused(128, 32, group_size=32)])
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.Grouped2BitLinear([fused(128, 32), fused(128, 40)])
    with pytest.raises(ValueError, match="bias"):
        kernels.Grouped2BitLinear([fused(128, 32, bias=True), fused(128, 32)])
    with pytest.raises(ValueError, match="Fused2BitLinear"):
        kernels.Grouped2BitLinear([fused(128, 32), nn.Linear(128, 32)])


def tiny_fused_qwen3(kernels):
    """A two-layer random Qwen3 whose seven projections per layer are random 2-bit Fused2BitLinear."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = Qwen3ForCausalLM(config).eval()
    seed = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    seed += 1
                    module = random_2bit_linear(child.in_features, child.out_features, group_size=32, seed=seed)
                    setattr(parent, name, kernels.Fused2BitLinear.from_gptq(module))
    return model


@pytest.mark.parametrize("max_rows", [64, 2])  # 2: the 5-token call is prefill-sized, members run their own
def test_grouped_projections_keep_the_models_output_in_four_kernel_calls_a_layer(kernels, monkeypatch, max_rows):
    model = tiny_fused_qwen3(kernels)
    ids = torch.tensor([[5, 9, 2, 33, 7]])
    with torch.no_grad():
        expected = model(ids).logits
    monkeypatch.setattr(kernels, "MAX_ROWS", max_rows)
    calls = []
    real = kernels.gptq2_matmul
    monkeypatch.setattr(kernels, "gptq2_matmul", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))

    assert kernels.group_2bit_projections(model) == 4  # q/k/v and gate/up of each of two layers
    assert isinstance(model.model.layers[0].self_attn.k_proj, kernels.GroupedMember)
    with torch.no_grad():
        grouped = model(ids).logits

    torch.testing.assert_close(grouped, expected, rtol=1e-4, atol=1e-4)
    chunks = -(-5 // max_rows)  # Fused2BitLinear's own calls split 5 rows into MAX_ROWS-row chunks
    assert len(calls) == (2 * 4 if max_rows == 64 else 2 * 7 * chunks)


def test_grouped_member_answers_only_the_input_its_group_ran(kernels):
    model = tiny_fused_qwen3(kernels)
    kernels.group_2bit_projections(model)
    attention = model.model.layers[0].self_attn
    x, other = torch.randn(1, 64), torch.randn(1, 64)
    attention.q_proj(x)
    expected = other @ dequantized(attention.k_proj.own.gptq)
    torch.testing.assert_close(attention.k_proj(other), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attention.k_proj(x), x @ dequantized(attention.k_proj.own.gptq), rtol=1e-4, atol=1e-4)
