import pytest
import torch
from transformers import Qwen3ForCausalLM

from inference.decoding.shapes import QWEN3_SHAPES, decode_step_bytes, linear_shapes, qwen3_config


def test_linear_shapes_are_the_decoder_layers_linears():
    # The 0.6B shape with 1 layer and a small vocabulary: same per-layer linears, built quickly.
    with torch.device("meta"):
        model = Qwen3ForCausalLM(qwen3_config("qwen3-0.6b", num_hidden_layers=1, vocab_size=64))
    layer = model.model.layers[0]
    linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert sorted((m.in_features, m.out_features) for m in linears) == sorted(linear_shapes(QWEN3_SHAPES["qwen3-0.6b"]))


def test_decode_step_bytes_count_weights_head_and_cache():
    shape = QWEN3_SHAPES["qwen3-8b"]
    linear_params = sum(k * n for k, n in linear_shapes(shape)) * shape["num_hidden_layers"]
    head = shape["vocab_size"] * shape["hidden_size"] * 2
    bf16 = decode_step_bytes(shape)
    assert bf16["kv_cache"] == 0
    assert bf16["weights"] == pytest.approx(linear_params * 2 + head, rel=1e-3)  # norms are the rest
    two_bit = decode_step_bytes(shape, bits=2, group_size=128)
    groups = sum(k // 128 * n for k, n in linear_shapes(shape)) * shape["num_hidden_layers"]
    assert two_bit["weights"] == pytest.approx(linear_params / 4 + groups * 2.25 + head, rel=1e-3)
    cached = decode_step_bytes(shape, batch=16, context=8192)
    per_position = shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * shape["head_dim"] * 2
    assert cached["kv_cache"] == 16 * 8192 * per_position and cached["total"] == cached["weights"] + cached["kv_cache"]
    assert two_bit["head"] == head and two_bit["linears"] == pytest.approx(linear_params / 4 + groups * 2.25, rel=1e-6)
    assert two_bit["weights"] - two_bit["linears"] - two_bit["head"] == two_bit["norms"] > 0


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="unknown Qwen3 shape 'qwen3-99b'"):
        qwen3_config("qwen3-99b")
