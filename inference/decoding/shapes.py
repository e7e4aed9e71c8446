"""The public Qwen3 model shapes, and the bytes one decode step must read at each of them.

Shapes are the published `config.json` values of the Qwen3 dense models (architecture only, no
weights): the decode benchmark builds random-weight models from them, and `rescue compare` uses them
to project a comparison measured on one model to the per-token costs of another (`--costs`).

Bytes per decode step (the memory-bandwidth floor divides them by the measured copy rate):
- every decoder-layer linear (q, k, v, o, gate, up, down): `bits / 8` bytes per weight, plus for
  GPTQ a 16-bit scale and a `bits`-bit zero per `group_size` weights of a column;
- the output head (vocabulary x hidden, kept in 16 bits by GPTQ as by us), read whole every step;
- the embedding: one row per sequence (negligible, counted as zero);
- the KV cache: `batch x context` positions of keys and values in 16 bits, per layer.
"""

from __future__ import annotations

QWEN3_SHAPES: dict[str, dict] = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "qwen3-14b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "qwen3-32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}


def qwen3_config(name: str, **overrides):
    """A `Qwen3Config` of a public shape (random-weight models for timing)."""
    from transformers import Qwen3Config

    if name not in QWEN3_SHAPES:
        raise ValueError(f"unknown Qwen3 shape {name!r}; known: {', '.join(QWEN3_SHAPES)}")
    return Qwen3Config(**{**QWEN3_SHAPES[name], "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
                          "max_position_embeddings": 40960, **overrides})


def linear_shapes(shape: dict) -> list[tuple[int, int]]:
    """(in_features, out_features) of one decoder layer's linears."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    return [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]


def decode_step_bytes(shape: dict, bits: int = 16, group_size: int = 128, batch: int = 1,
                      context: int = 0) -> dict:
    """Bytes one decode step reads at `shape` (see the module docstring): weights (the decoder layers'
    `linears`, the output `head` and the `norms`' weights), KV cache, total."""
    linears = 0.0
    for k, n in linear_shapes(shape):
        linears += k * n * bits / 8
        if bits < 16:
            groups = k / (group_size if group_size > 0 else k)
            linears += groups * n * (2 + bits / 8)
    linears *= shape["num_hidden_layers"]
    head = shape["vocab_size"] * shape["hidden_size"] * 2
    norms = (2 * shape["hidden_size"] + 2 * shape["head_dim"]) * 2 * shape["num_hidden_layers"]
    kv = (batch * context * shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * shape["head_dim"] * 2)
    weights = int(linears + head + norms)
    return {"weights": weights, "linears": int(linears), "head": head, "norms": norms, "kv_cache": int(kv),
            "total": int(weights + kv)}
