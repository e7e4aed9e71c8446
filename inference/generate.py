"""The decoding loop: batched, KV-cached, left-padded, with one hook called after every step.

Every consumer that needs to watch generation (trace collection, the rule trigger, the learned
trigger) is a `StepHook`; none of them re-implements decoding. The hidden states handed to the hook
come from the forward pass that produced the new token (`output_hidden_states` of that same call):
no second pass over the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

FINISH_EOS = "eos"
FINISH_BUDGET = "budget"
FINISH_STOPPED = "stopped"


@dataclass
class StepView:
    """What the hook sees after one decoding step, for the sequences still generating.

    `rows` are batch indices of the live sequences; `tokens[i]` is the token just chosen for row
    `rows[i]`, at generated position `step`. `hidden[layer][i]` is that row's output of decoder
    layer `layer` (as configured, negative counts from the end) at the position that produced the
    token, i.e. what the model "thought" when it chose it; shape (len(rows), hidden_size).
    `top_prob[i]` is the model's own probability of its most likely next token at that position
    (softmax of the raw logits, before temperature and truncation; None unless `generate` was asked
    for it): the confidence rule reads it.
    """

    step: int
    rows: torch.Tensor
    tokens: torch.Tensor
    hidden: dict[int, torch.Tensor]
    top_prob: torch.Tensor | None = None


StepHook = Callable[[StepView], "torch.Tensor | None"]
"""Called after every step. It may return a bool tensor aligned with `view.rows`: the rows marked True
stop generating now (finish reason `stopped`, the token just chosen kept), so a controller can act on
them while the rest of the batch goes on."""


@dataclass
class Generation:
    """Per sequence: generated token ids (EOS included when emitted) and why generation stopped."""

    generated_ids: list[list[int]]
    finish_reasons: list[str]
    steps: int = 0
    prompt_lengths: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Sampler:
    """Token choice: greedy when temperature is 0, else temperature, top-k and top-p sampling.

    The warpers are transformers' own, applied in the order `model.generate` applies them.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        warpers = LogitsProcessorList()
        if self.temperature > 0:
            if self.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                warpers.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                warpers.append(TopPLogitsWarper(self.top_p))
        object.__setattr__(self, "_warpers", warpers)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row of `logits` (batch, vocab). The warpers used here ignore past tokens."""
        logits = logits.float()
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        scores = self._warpers(None, logits)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def resolve_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Configured layer indices (negative from the end) as 0-based decoder layer indices."""
    resolved = []
    for layer in layers:
        index = layer + num_layers if layer < 0 else layer
        if not 0 <= index < num_layers:
            raise ValueError(f"layer {layer} does not exist in a model with {num_layers} decoder layers")
        resolved.append(index)
    return resolved


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    sampler: Sampler = Sampler(),
    generator: torch.Generator | None = None,
    layers: Sequence[int] = (),
    hook: StepHook | None = None,
    top_prob: bool = False,
) -> Generation:
    """Decode a left-padded batch until every sequence emits an EOS token or `max_new_tokens`.

    `layers` are the decoder layers whose hidden states the hook receives (none: the forward pass
    skips collecting them). Finished sequences are fed `pad_token_id` and hidden from the hook.
    `top_prob`: also hand the hook each row's top-token probability (a softmax over the vocabulary
    per step, so only when asked).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    device = input_ids.device
    batch = input_ids.shape[0]
    num_layers = model.config.num_hidden_layers
    layer_ids = resolve_layers(layers, num_layers)
    want_hidden = hook is not None and bool(layer_ids)
    eos = torch.tensor(list(eos_token_ids), device=device)

    attention_mask = attention_mask.to(device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    live = torch.ones(batch, dtype=torch.bool, device=device)
    generated = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    finish = [FINISH_BUDGET] * batch

    step_input = input_ids
    step_positions = position_ids
    step = 0
    for step in range(max_new_tokens):
        outputs = model(
            input_ids=step_input,
            attention_mask=attention_mask,
            position_ids=step_positions,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=want_hidden,
            logits_to_keep=1,
        )
        logits = outputs.logits[:, -1, :]
        tokens = sampler.choose(logits, generator)
        tokens = torch.where(live, tokens, torch.full_like(tokens, pad_token_id))

        rows = live.nonzero().squeeze(1)
        generated[rows, step] = tokens[rows]
        lengths[rows] += 1
        stopped = None
        if hook is not None:
            # hidden_states[0] is the embedding output; layer i's output is hidden_states[i + 1].
            hidden = (
                {layer: outputs.hidden_states[index + 1][rows, -1, :] for layer, index in zip(layers, layer_ids)}
                if want_hidden
                else {}
            )
            confidence = torch.softmax(logits[rows].float(), dim=-1).amax(dim=-1) if top_prob else None
            stopped = hook(StepView(step=step, rows=rows, tokens=tokens[rows], hidden=hidden, top_prob=confidence))

        hit_eos = live & torch.isin(tokens, eos)
        for row in hit_eos.nonzero().squeeze(1).tolist():
            finish[row] = FINISH_EOS
        live = live & ~hit_eos
        if stopped is not None:
            stop_rows = rows[stopped.to(device=device, dtype=torch.bool)]
            for row in stop_rows.tolist():
                if live[row]:
                    finish[row] = FINISH_STOPPED
            live[stop_rows] = False
        if not bool(live.any()):
            break

        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=1)
        step_positions = step_positions[:, -1:] + 1
        step_input = tokens[:, None]

    generated_ids = [generated[row, : lengths[row]].tolist() for row in range(batch)]
    prompt_lengths = attention_mask[:, : input_ids.shape[1]].sum(-1).tolist()
    return Generation(generated_ids, finish, steps=step + 1, prompt_lengths=prompt_lengths)
