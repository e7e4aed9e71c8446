"""The decode benchmark's step timing runs on the CPU too (its smoke run), without touching CUDA."""
import sys
from pathlib import Path

import torch
from transformers import Qwen3ForCausalLM

from inference.decoding.shapes import qwen3_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import decode  # noqa: E402  (benchmarks/decode.py)


def test_step_latency_times_eager_steps_on_the_cpu():
    torch.manual_seed(0)
    config = qwen3_config("qwen3-0.6b", attn_implementation="sdpa", num_hidden_layers=1, hidden_size=64,
                          intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          vocab_size=97)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        seconds = decode.step_latency(model, batch=2, context=8, steps=2)
    assert 0 < seconds < 10


def test_step_latency_rewinds_the_cache_between_passes():
    """Warm-up and timed passes of `steps` steps each write from `context` again: three passes of 8 steps (24 writes)
    would overrun the 8 + 8 + 8 cache without the rewind, and the cache must not grow past it."""
    torch.manual_seed(0)
    config = qwen3_config("qwen3-0.6b", attn_implementation="sdpa", num_hidden_layers=1, hidden_size=64,
                          intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          vocab_size=97)
    model = Qwen3ForCausalLM(config).eval()
    timings = {}
    with torch.no_grad():
        seconds = decode.step_latency(model, batch=1, context=8, steps=8, timings=timings)
    assert 0 < seconds < 10
    assert 0 < timings["first_replays_seconds"] < 10
