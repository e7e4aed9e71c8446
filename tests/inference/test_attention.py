"""Grouped decode attention: the same outputs as HF's SDPA path, without copying the cache per query head;
the split-cache Triton kernel run on the CPU by Triton's interpreter."""

import warnings

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from inference.decoding import attention as attention_module
from inference.decoding.attention import (GROUPED, SPLIT_KV, attention_plan, grouped_attention, use_decode_attention,
                                         use_grouped_attention, use_hf_attention)
from inference.decoding.generate import generate


def tiny_gqa(kv_heads: int = 2, attn: str = "sdpa"):
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=kv_heads, head_dim=16,
                         max_position_embeddings=256, attn_implementation=attn)
    return Qwen3ForCausalLM(config).eval()


def padded_batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (3, 9), generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4], mask[1, :1] = 0, 0
    return ids, mask


def test_a_decode_query_packed_onto_the_key_value_heads_gives_the_repeated_heads_result():
    from transformers.integrations.sdpa_attention import repeat_kv

    model = tiny_gqa(kv_heads=2)
    module = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(3, 8, 1, 16, generator=generator)
    key, value = torch.randn(3, 2, 20, 16, generator=generator), torch.randn(3, 2, 20, 16, generator=generator)
    mask = torch.rand(3, 1, 1, 20, generator=generator) > 0.3
    mask[..., 0] = True
    output, _ = grouped_attention(module, query, key, value, mask, scaling=module.scaling)
    # Reference: every query head against its own copy of key/value head h // 4.
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 4), repeat_kv(value, 4), attn_mask=mask, scale=module.scaling).transpose(1, 2)
    assert output.shape == (3, 1, 8, 16)
    torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-6)
    # A wrong head-to-group order (head h with key/value head h % 2) would not match.
    wrong = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat(1, 4, 1, 1), value.repeat(1, 4, 1, 1), attn_mask=mask, scale=module.scaling).transpose(1, 2)
    assert not torch.allclose(output, wrong, atol=1e-3)


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_grouped_attention_chooses_hf_sdpa_greedy_tokens_on_a_padded_batch(decode, monkeypatch):
    model = tiny_gqa(kv_heads=2)
    ids, mask = padded_batch()
    run = lambda: generate(model, ids, mask, max_new_tokens=12, eos_token_ids=[], pad_token_id=0, decode=decode,
                           layers=[1]).generated_ids
    hf = run()
    assert use_grouped_attention(model, kernel=False)
    assert model.config._attn_implementation == GROUPED
    queries = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda query, *args, **kwargs: queries.append(tuple(query.shape)) or sdpa(query, *args, **kwargs))
    assert run() == hf
    assert (3, 2, 4, 16) in queries  # decode steps ran packed: 2 key/value heads, 4 query rows each
    use_hf_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_grouped_attention_logits_match_through_prefill_and_decode():
    model = tiny_gqa(kv_heads=4)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        use_grouped_attention(model, kernel=False)
        after = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(after[real], before[real], rtol=1e-5, atol=1e-5)


def test_only_an_sdpa_model_is_switched():
    eager = tiny_gqa(attn="eager")
    assert not use_grouped_attention(eager)
    assert eager.config._attn_implementation == "eager"


def test_the_loaders_keep_hf_attention_on_the_cpu(tiny_model_dir):
    """Grouped attention is for CUDA; on a CPU the embedded models' recorded traces keep HF's SDPA."""
    from inference.decoding.models import load_full_precision

    model, _ = load_full_precision(str(tiny_model_dir), dtype="float32", device="cpu")
    assert model.config._attn_implementation == "sdpa"


def test_benchmarks_switch_decode_attention_by_name():
    model = tiny_gqa()
    use_decode_attention(model, "grouped")
    assert model.config._attn_implementation == GROUPED
    use_decode_attention(model, "split")
    assert model.config._attn_implementation == (SPLIT_KV if attention_module.triton is not None else GROUPED)
    use_decode_attention(model, "hf")
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="split, grouped, hf"):
        use_decode_attention(model, "flash")


@pytest.fixture(scope="module")
def interpreted(interpreted_copy):
    """inference.decoding.attention with its kernels in Triton's interpreter (conftest.interpreted_copy);
    the real module's operator registration is restored after."""
    pytest.importorskip("triton")
    with interpreted_copy("inference.decoding.attention", "_split_kv_kernel") as module:
        yield module
    attention_module.register()


def repeated_reference(query, key, value, mask, scale):
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("batch,heads,kv_heads,length,dim,mask_kind", [
    (3, 8, 2, 200, 16, "bool"),     # 4 chunks of 64, the last one partial
    (1, 32, 8, 300, 128, "bool"),   # Qwen3-8B's heads; 5 chunks
    (2, 4, 2, 70, 32, "float"),     # an additive mask
    (2, 4, 4, 70, 32, "none"),      # one query head per key/value head, no mask
    (70, 4, 2, 40, 16, "bool"),     # enough rows for one chunk: the first kernel writes the output
    (1, 12, 4, 1, 16, "bool"),      # one cached position
])
def test_split_kv_kernel_matches_sdpa_over_repeated_heads(interpreted, batch, heads, kv_heads, length, dim,
                                                         mask_kind):
    generator = torch.Generator().manual_seed(length)
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=generator) for _ in range(2))
    mask = None
    if mask_kind != "none":
        keep = torch.rand(batch, 1, 1, length, generator=generator) > 0.3
        keep[..., -1] = True  # a decode query always sees its own position
        mask = keep if mask_kind == "bool" else torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy: finfo.min * log2(e) overflows to -inf, as meant
        output = interpreted.decode_attention(query, key, value, mask, dim ** -0.5)
    assert output.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(output, repeated_reference(query, key, value, mask, dim ** -0.5), rtol=1e-5, atol=1e-5)


def test_split_kv_kernel_reads_a_strided_cache_window(interpreted):
    """The static cache's window is a slice of a longer cache (non-contiguous keys and values)."""
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 8, 1, 16, generator=generator)
    key, value = (torch.randn(2, 2, 256, 16, generator=generator)[:, :, :130] for _ in range(2))
    mask = torch.ones(2, 1, 1, 130, dtype=torch.bool)
    mask[0, ..., :7] = False
    output = interpreted.decode_attention(query, key, value, mask, 0.25)
    torch.testing.assert_close(output, repeated_reference(query, key, value, mask, 0.25), rtol=1e-5, atol=1e-5)


def test_split_kv_kernel_does_not_read_the_keys_and_values_a_boolean_mask_closes(interpreted):
    """Masked positions (the window past the last written slot, left padding) are not loaded: NaN written
    there does not reach the output, which matches attention over the open positions alone. The
    ungated baseline the benchmark times reads them, and their NaN spreads through its product."""
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(2, 8, 1, 16, generator=generator)
    key, value = (torch.randn(2, 2, 300, 16, generator=generator) for _ in range(2))
    mask = torch.zeros(2, 1, 1, 300, dtype=torch.bool)
    mask[0, ..., :150] = True   # a window half written
    mask[1, ..., 40:150] = True  # and a left-padded row
    poisoned_key, poisoned_value = key.clone(), value.clone()
    for tensor in (poisoned_key, poisoned_value):
        tensor.masked_fill_(~mask[:, 0, 0, :, None].unsqueeze(1).expand_as(tensor), float("nan"))
    output = interpreted.decode_attention(query, poisoned_key, poisoned_value, mask, 0.25)
    torch.testing.assert_close(output, repeated_reference(query, key, value, mask, 0.25), rtol=1e-5, atol=1e-5)
    assert interpreted.decode_attention(query, poisoned_key, poisoned_value, mask, 0.25, gated=False).isnan().any()


def test_split_kv_kernel_is_one_operator_under_torch_compile(interpreted):
    """torch.compile traces the kernel's launches as one custom operator with a fake (shape-only) version, so
    the compiled graph calls the same launches and gives the eager result."""
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(2, 8, 1, 16, generator=generator)
    key, value = (torch.randn(2, 2, 150, 16, generator=generator) for _ in range(2))
    mask = torch.rand(2, 1, 1, 150, generator=generator) > 0.2
    mask[..., -1] = True
    step = lambda q: interpreted.decode_attention(q * 2.0, key, value, mask, 0.25) + 1.0
    graphs = []

    def backend(graph, inputs):
        graphs.append(graph)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda g, _: g)(graph, inputs)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(query), step(query), rtol=0, atol=0)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("decode_attention_interpreted" in target for target in targets) == 1
    torch.testing.assert_close(compiled(query), repeated_reference(query * 2.0, key, value, mask, 0.25) + 1.0,
                               rtol=1e-5, atol=1e-5)


def test_attention_plan_fills_the_gpu_with_chunks_that_cover_the_cache():
    for batch, kv_heads, length in [(1, 8, 1062), (16, 8, 1062), (64, 8, 8200), (1, 8, 40), (256, 8, 9000)]:
        plan = attention_plan(batch, kv_heads, length)
        chunk, splits = plan["chunk"], plan["splits"]
        assert chunk % attention_module.BLOCK_N == 0
        assert (splits - 1) * chunk < length <= splits * chunk
        assert plan["grid"] == (batch * kv_heads, splits)
    assert attention_plan(1, 8, 1062)["splits"] == 17  # one 8B row: 136 programs, not SDPA's 8
    assert attention_plan(64, 8, 8200)["splits"] == 2
    assert attention_plan(256, 8, 9000)["splits"] == 1


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_split_kv_attention_chooses_hf_sdpa_greedy_tokens_on_a_padded_batch(interpreted, decode, monkeypatch):
    model = tiny_gqa(kv_heads=2)
    ids, mask = padded_batch()
    run = lambda: generate(model, ids, mask, max_new_tokens=12, eos_token_ids=[], pad_token_id=0, decode=decode,
                           layers=[1]).generated_ids
    hf = run()
    assert interpreted.use_grouped_attention(model)
    assert model.config._attn_implementation == SPLIT_KV
    calls = []
    kernel = interpreted.decode_attention
    monkeypatch.setattr(interpreted, "decode_attention", lambda *args: calls.append(args[0].shape) or kernel(*args))
    assert run() == hf
    assert calls and all(shape[2] == 1 for shape in calls)  # every decode step's attention ran the kernel


def test_without_a_gpu_split_kv_attention_runs_packed_sdpa():
    """On CPU tensors (no interpreter) the kernel is not used and the packed SDPA result comes back."""
    model = tiny_gqa(kv_heads=2)
    module = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(3, 8, 1, 16, generator=generator)
    key, value = torch.randn(3, 2, 20, 16, generator=generator), torch.randn(3, 2, 20, 16, generator=generator)
    mask = torch.rand(3, 1, 1, 20, generator=generator) > 0.3
    assert not attention_module.kernel_runs(query, key, 4)
    output, _ = attention_module.split_kv_attention(module, query, key, value, mask, scaling=0.25)
    expected, _ = grouped_attention(module, query, key, value, mask, scaling=0.25)
    assert torch.equal(output, expected)
