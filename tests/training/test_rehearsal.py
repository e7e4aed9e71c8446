"""Rehearsal models: the Qwen3 shapes' configs, the tokenizer trained here, a tiny random model of the
same architecture saved and run like a real one, and the published-layout 2-bit packing."""

import json

import pytest
import torch

from conftest import SHARED_DATA
from inference.decoding.memory import kv_bytes_per_position
from inference.errors import RescueError
from inference.prompts import render_prompt
from training.rehearsal import (QWEN3_ADDED_TOKENS, build_rehearsal_model, math500_texts, pack_columns, pack_rows,
                                rehearsal_config, round_to_nearest, train_tokenizer)

MATH500 = SHARED_DATA / "math500_test.jsonl"
TEXTS = [
    "Find the value of $x$ such that $\\sqrt{x + 7} = 9$.",
    "We square both sides: $x + 7 = 81$, so $x = \\boxed{74}$.",
    "Compute $\\dbinom{8}{4}$. We have $\\dbinom{8}{4} = \\frac{8!}{4!4!} = 70$.",
] * 20
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=1024)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=512)


def test_shapes_are_the_published_qwen3_configs(tokenizer):
    small, large = rehearsal_config("qwen3-0.6b", tokenizer), rehearsal_config("qwen3-8b", tokenizer)
    assert (small.hidden_size, small.intermediate_size, small.num_hidden_layers, small.num_attention_heads,
            small.num_key_value_heads, small.head_dim, small.tie_word_embeddings) == (1024, 3072, 28, 16, 8, 128, True)
    assert (large.hidden_size, large.intermediate_size, large.num_hidden_layers, large.num_attention_heads,
            large.num_key_value_heads, large.tie_word_embeddings) == (4096, 12288, 36, 32, 8, False)
    for config in (small, large):
        assert config.vocab_size == 151936 and config.max_position_embeddings == 40960
        assert config.rope_parameters["rope_theta"] == 1_000_000 and config.rms_norm_eps == 1e-6
        assert config.eos_token_id == tokenizer.eos_token_id and config.pad_token_id == tokenizer.pad_token_id
    assert kv_bytes_per_position(large, torch.bfloat16) == 147_456  # the 8B's 147 KB per cached token


def test_tokenizer_has_qwen3_markup_as_single_tokens_and_thinking_template(tokenizer):
    for token in QWEN3_ADDED_TOKENS:
        assert tokenizer(token).input_ids == [tokenizer.convert_tokens_to_ids(token)]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    prompt = render_prompt(tokenizer, "What is $2+3$?")
    assert prompt.startswith("<|im_start|>user\nWhat is $2+3$?") and prompt.endswith("<|im_start|>assistant\n")
    assert render_prompt(tokenizer, "Hi", enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    text = "<think>\nWe have $x = 74$.\n</think>\n\nThe answer is \\boxed{74}.<|im_end|>"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text  # byte-level: every text round-trips
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.removesuffix("<|im_end|>")  # think markers stay
    assert len(tokenizer(TEXTS[1]).input_ids) < len(TEXTS[1]) / 2  # merges learned from the corpus


@pytest.mark.skipif(not MATH500.is_file(), reason=f"{MATH500} is absent")
def test_math500_texts_are_problems_and_solutions():
    texts = math500_texts(MATH500)
    assert len(texts) == 1000 and any("\\boxed" in t for t in texts)


def test_math500_texts_refuses_a_file_without_text(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"answer": "3"}) + "\n")
    with pytest.raises(RescueError, match="empty.jsonl: no 'problem' or 'solution'"):
        math500_texts(path)


def test_rehearsal_model_saves_loads_and_generates_like_a_real_one(tmp_path):
    from inference.decoding.generate import generate
    from inference.decoding.models import load_full_precision

    record = build_rehearsal_model("qwen3-8b", tmp_path / "m", TEXTS, tokenizer_vocab=512, **TINY)
    assert record["vocab_size"] == 1024 and record["tokenizer_tokens"] == len(train_tokenizer(TEXTS, 512))
    model, tokenizer = load_full_precision(str(tmp_path / "m"), dtype="float32", device="cpu")
    assert model.config.max_position_embeddings == 40960 and not model.config.tie_word_embeddings
    encoded = tokenizer([render_prompt(tokenizer, "What is 1+1?")], return_tensors="pt")
    out = generate(model, encoded.input_ids, encoded.attention_mask, max_new_tokens=6,
                   eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, decode="static")
    assert 1 <= len(out.generated_ids[0]) <= 6


def test_rehearsal_model_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path):
    with pytest.raises(RescueError, match="more than the 256 rows"):
        build_rehearsal_model("qwen3-0.6b", tmp_path / "m", TEXTS, tokenizer_vocab=512, **{**TINY, "vocab_size": 256})
    assert not (tmp_path / "m").exists()


def test_round_to_nearest_packs_codes_in_gptq_bit_order():
    torch.manual_seed(0)
    weight = torch.randn(48, 64)  # [out, in]
    codes, zeros, scales = round_to_nearest(weight, group_size=32)
    assert codes.shape == (64, 48) and zeros.shape == scales.shape == (2, 48)
    assert codes.min() >= 0 and codes.max() <= 3 and bool((zeros == 2).all())
    rebuilt = (codes.float() - zeros.float().repeat_interleave(32, 0)) * scales.float().repeat_interleave(32, 0)
    assert (rebuilt.T - weight).abs().max() <= scales.float().max() / 2 * 1.01 + weight.abs().max() / 2
    words = pack_rows(codes)
    assert words.dtype == torch.int32 and words.shape == (4, 48)
    unpacked = torch.stack([(words.long() >> (2 * i)) & 3 for i in range(16)], dim=1).reshape(64, 48)
    assert torch.equal(unpacked, codes.long())
    zero_words = pack_columns(zeros - 1)  # v1: stored minus one
    assert zero_words.shape == (2, 3)
    assert bool(((zero_words.long() >> 2) & 3 == 1).all())
