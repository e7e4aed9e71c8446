"""Grouped decode attention: the same outputs as HF's SDPA path, without copying the cache per query head."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from inference.decoding.attention import (GROUPED, grouped_attention, use_decode_attention, use_grouped_attention,
                                         use_hf_attention)
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
    assert use_grouped_attention(model)
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
        use_grouped_attention(model)
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
    use_decode_attention(model, "hf")
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="grouped, hf"):
        use_decode_attention(model, "flash")
