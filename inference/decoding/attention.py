"""Decode attention for grouped-query models that reads each layer's keys and values once.

Qwen3 has fewer key/value heads than query heads (8 for 16 or 32). On CUDA, HF's SDPA path passes them
to `scaled_dot_product_attention` as grouped heads only when no mask is given; with the 4D mask of a
padded batch (every batch `generate` runs) it first copies keys and values out to one head per query
head (`repeat_kv`). A decode step then writes and reads two to four copies of the cache it only needs to
read, in every layer. transformers 5.24 packs the single query of a decode step onto the key/value
heads instead, but not under torch.compile, and earlier 5.x releases never do.

`grouped_attention` does that packing always: a decode step's query [batch, heads, 1, dim] becomes
[batch, kv_heads, heads / kv_heads, dim], so that the G query heads of one key/value head are G query rows
of one attention over that head's keys, and the mask [batch, 1, 1, length] broadcasts over them. Every
other call (prefill, one key/value head per query head, per-head masks) goes to HF's own SDPA function.
Query head h attends with key/value head h // G in both, as in `repeat_kv`.

`use_grouped_attention` registers it with transformers' attention interfaces under `GROUPED` and
switches a model to it. The loaders do that on CUDA only: on a CPU the copies are cheap, and a
different summation order there would change the embedded models' recorded traces.
"""

from __future__ import annotations

import torch

GROUPED = "lowbit_grouped_sdpa"
"""The attention implementation's name in transformers' AttentionInterface."""


def grouped_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """HF's attention-function signature: (output [batch, q_len, heads, dim], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    plain = (q_len != 1 or groups == 1 or kwargs.get("position_bias") is not None
             or kwargs.get("softcap") is not None or kwargs.get("output_attentions", False)
             or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1)))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    packed = query.reshape(batch, heads // groups, groups, dim)
    output = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask,
                                                              dropout_p=dropout, scale=scaling)
    return output.reshape(batch, 1, heads, value.shape[-1]), None


def register() -> None:
    """Make `GROUPED` a valid attn_implementation (with SDPA's mask builder); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED, grouped_attention)
    AttentionMaskInterface.register(GROUPED, sdpa_mask)


def use_grouped_attention(model) -> bool:
    """Switch a model whose attention is HF's SDPA to `GROUPED`; returns whether it now runs it.

    Models on another implementation (eager, flash attention) keep it."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == GROUPED:
        return True
    if current != "sdpa":
        return False
    register()
    model.set_attn_implementation(GROUPED)
    return model.config._attn_implementation == GROUPED


def use_hf_attention(model) -> None:
    """Back to HF's own SDPA function (benchmarks compare the two on one model)."""
    if getattr(model.config, "_attn_implementation", None) == GROUPED:
        model.set_attn_implementation("sdpa")


DECODE_ATTENTIONS = ("grouped", "hf")
"""The attentions benchmarks compare by name: `grouped` (this module's) and `hf` (HF's SDPA function)."""


def use_decode_attention(model, name: str) -> None:
    """Switch a model to one of DECODE_ATTENTIONS."""
    if name not in DECODE_ATTENTIONS:
        raise ValueError(f"decode attention must be one of {', '.join(DECODE_ATTENTIONS)}, got {name!r}")
    if name == "grouped":
        use_grouped_attention(model)
    else:
        use_hf_attention(model)
