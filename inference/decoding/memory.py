"""How many rows a generation batch may hold: the static KV cache and the capture buffers of every row
are sized from the budget, and the batch from the GPU's free memory.

A static cache holds `prompt + budget` positions for every row whether or not the row ever uses them
(a random-weight model, or a 2-bit model that never closes `</think>`, runs every row to the budget),
so at reasoning budgets the cache, not the weights, decides what fits: the Qwen3-8B shape caches
36 layers x 2 x 8 heads x 128 x 2 bytes = 147 KB per position, 1.2 GB per row at budget 8,192 and
4.8 GB at 32,768. `plan_batch` divides what may still be allocated (the card's capacity x
`memory_fraction`, less what is in use) by an upper bound of one row's bytes (`row_bytes`) and keeps
the configured `batch_size` as the most rows; a budget that leaves no room for one row, or that runs
past the model's context, is refused before any generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.errors import ConfigError

MEMORY_FRACTION = 0.9
"""Share of the card a batch may bring the process's allocations up to (the rest: allocator slack,
CUDA graph pools, library workspaces)."""

_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


@dataclass(frozen=True)
class BatchPlan:
    """The rows of one generation batch and why: `limit` is "config" (sampling.batch_size), "memory"
    (what the free memory holds), "rows" (fewer rows are left) or "cpu" (no GPU: the config's)."""

    batch: int
    requested: int
    limit: str
    row_bytes: int
    available_bytes: int | None

    def describe(self) -> str:
        """The progress bar's note: `batch 12 (memory: 5.1 GB/row)`."""
        note = f"{self.limit}" if self.limit != "memory" else f"memory: {size_text(self.row_bytes)}/row"
        return f"{self.batch} ({note})"


def size_text(count: int) -> str:
    """Bytes as GB with two decimals, or MB below a tenth of a GB."""
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.2f} MB"


def kv_bytes_per_position(model_config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one cached position holds across all layers."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return model_config.num_hidden_layers * 2 * model_config.num_key_value_heads * head_dim * _BYTES[dtype]


def row_bytes(model_config, prompt_length: int, budget: int, dtype: torch.dtype, captured_layers: int = 0,
              capture_dtype: torch.dtype = torch.float16) -> int:
    """An upper bound of the GPU bytes one batch row needs while a batch of `prompt_length + budget`
    positions is generated on the static path, hidden states of `captured_layers` layers recorded.

    Counted: the KV cache; the recorder's buffers (states at every step, top-token probability, token
    ids); the prefill's transients (every layer's states, kept for `output_hidden_states`, the MLP's
    activations, and attention scores over the whole cache in float32, as an eager kernel would hold
    them); one step's float32 logits and their sampling copies.
    """
    length = prompt_length + budget
    hidden = model_config.hidden_size
    width = _BYTES[dtype]
    kv = kv_bytes_per_position(model_config, dtype) * length
    recorder = budget * (captured_layers * hidden * _BYTES[capture_dtype] + 4 + 8)
    states = (model_config.num_hidden_layers + 1) * prompt_length * hidden * width
    mlp = 3 * prompt_length * model_config.intermediate_size * width
    scores = model_config.num_attention_heads * prompt_length * length * 4
    logits = 4 * model_config.vocab_size * 4
    return int(kv + recorder + states + mlp + scores + logits)


def check_context(model_config, prompt_length: int, budget: int, source: str = "the model") -> None:
    """Refuse a budget whose longest sequence runs past the model's context (max_position_embeddings)."""
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and prompt_length + budget > context:
        raise ConfigError(f"sampling.budget {budget} + the longest prompt ({prompt_length} tokens) = "
                          f"{prompt_length + budget} positions, past the {context}-position context of {source} "
                          f"(max_position_embeddings in its config.json); lower sampling.budget to at most "
                          f"{context - prompt_length}")


def available_bytes(device: torch.device, memory_fraction: float = MEMORY_FRACTION) -> int | None:
    """Bytes that may still be allocated on `device` before the process holds `memory_fraction` of the
    card (None on a CPU: no limit is applied there). Memory PyTorch's allocator keeps cached but unused
    (an earlier batch's cache) counts as available."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached - (1 - memory_fraction) * total)


def plan_batch(model_config, rows: int, requested: int, prompt_length: int, budget: int, dtype: torch.dtype,
               available: int | None, captured_layers: int = 0,
               capture_dtype: torch.dtype = torch.float16) -> BatchPlan:
    """The batch for `rows` waiting rows: at most `requested` (sampling.batch_size) and what `available`
    bytes hold (None: no memory limit). Refuses when not even one row fits."""
    per_row = row_bytes(model_config, prompt_length, budget, dtype, captured_layers, capture_dtype)
    limit, batch = ("rows", rows) if rows < requested else ("config" if available is not None else "cpu", requested)
    if available is not None:
        fits = max(0, available) // per_row
        if fits < 1:
            raise ConfigError(
                f"sampling.budget {budget}: one row needs {size_text(per_row)} on the GPU (static KV cache of "
                f"{prompt_length + budget} positions and captured states), but only {size_text(max(0, available))} "
                f"are free; lower sampling.budget or use a GPU with more memory")
        if fits < batch:
            limit, batch = "memory", int(fits)
    return BatchPlan(batch=batch, requested=requested, limit=limit, row_bytes=per_row, available_bytes=available)
