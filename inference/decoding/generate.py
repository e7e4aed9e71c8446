"""The decoding loop: batched, KV-cached, left-padded, with one hook called after every step.

Every consumer that needs to watch generation (trace collection, the rule trigger, the learned
trigger) is a `StepHook`; none of them re-implements decoding. The hidden states handed to the hook
come from the forward pass that produced the new token (`output_hidden_states` of that same call):
no second pass over the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from inference.decoding.steps import DECODE_PATHS, BatchPast, DynamicSteps, StaticSteps, StepOutputs, StepProbe

FINISH_EOS = "eos"
FINISH_BUDGET = "budget"
FINISH_STOPPED = "stopped"


class StepView:
    """What the hook sees after one decoding step, for the sequences still generating.

    `rows` are batch indices of the live sequences; `tokens[i]` is the token just chosen for row
    `rows[i]`, at generated position `step`. `hidden[layer][i]` is that row's output of decoder
    layer `layer` (as configured, negative counts from the end) at the position that produced the
    token, i.e. what the model "thought" when it chose it; shape (len(rows), hidden_size).
    `top_prob[i]` is the model's own probability of its most likely next token at that position
    (softmax of the raw logits, before temperature and truncation; None unless `generate` was asked
    for it): the confidence rule reads it. `scores` is the `probe` given to `generate`, run on this
    step's states (None without one).

    `tokens`, `hidden`, `top_prob` and `scores` are copies made on first read, so a hook pays only for
    what it reads; they are the hook's to keep. `outputs` is the step's own output for every batch row
    (`StepOutputs`), which the next step overwrites on the static path: read it, and anything not yet
    read, inside the hook (a view read after its hook returned raises).
    """

    def __init__(self, step: int, rows: torch.Tensor, chosen: torch.Tensor, outputs: StepOutputs):
        self.step, self.rows = step, rows
        self._chosen, self._outputs, self._open = chosen, outputs, True

    @property
    def outputs(self) -> StepOutputs:
        self._check_open("outputs")
        return self._outputs

    @cached_property
    def tokens(self) -> torch.Tensor:
        self._check_open("tokens")
        return self._chosen[self.rows]

    @cached_property
    def hidden(self) -> dict[int, torch.Tensor]:
        self._check_open("hidden")
        return {layer: states[self.rows] for layer, states in self._outputs.hidden.items()}

    @cached_property
    def top_prob(self) -> torch.Tensor | None:
        self._check_open("top_prob")
        return None if self._outputs.top_prob is None else self._outputs.top_prob[self.rows]

    @cached_property
    def scores(self) -> torch.Tensor | None:
        self._check_open("scores")
        return None if self._outputs.scores is None else self._outputs.scores[self.rows]

    def close(self) -> None:
        """Called when the hook returns: the step's outputs are about to be reused."""
        self._open = False

    def _check_open(self, name: str) -> None:
        if not self._open:
            raise RuntimeError(f"StepView.{name} of step {self.step} was first read after the hook returned; the "
                               "next step reuses the step's outputs, so read it inside the hook")


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
    caches: list[DynamicCache] | None = None
    """With `keep_cache`: per sequence, a one-row cache of every token it fed (`past`'s, the prompt's, then
    all it generated but the last token)."""


DRAW_IN_STEP = True
"""On the static paths, whether the step draws the next tokens itself (`StaticSteps`' sampler, in the CUDA graph
on a GPU) rather than `generate` calling `Sampler.choose` on its logits after it: no sampling kernels launched
from Python per step. The draws differ from `choose`'s for the same seed (inverse CDF against multinomial), so a
seeded sampled run on a static path differs from the same run on the dynamic path. `benchmarks/decode_step.py`
times both."""

CANDIDATES_FROM_VOCAB = 8192
"""Vocabulary size from which top-k sampling first takes the candidates (`Sampler.choose`)."""
TIE_MARGIN = 8
"""Candidates taken past top_k, so that the scores tied with the k-th are kept as TopKLogitsWarper keeps them."""


@dataclass(frozen=True)
class Sampler:
    """Token choice: greedy when temperature is 0, else temperature, top-k and top-p sampling.

    The warpers are transformers' own, applied in the order `model.generate` applies them. With top-k
    and a vocabulary of at least CANDIDATES_FROM_VOCAB tokens (a real model's 151,936), top-p and the
    draw run on the top_k + TIE_MARGIN highest scores only, not on the whole vocabulary (whose sort
    is what top-p costs): the same kept tokens and probabilities up to float rounding, every score
    tied with the k-th included, but a different draw for the same seed than the whole-vocabulary
    path. A batch with a row whose tie runs past the margin takes the whole-vocabulary path.
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
        candidates = self.candidates(logits) if self._few(logits.shape[-1]) else None
        if candidates is not None:
            scores, indices = candidates
            picked = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator)
            return indices.gather(1, picked).squeeze(1)
        scores = self._warpers(None, logits)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    def draw(self, logits: torch.Tensor, uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`choose` without a host sync or a branch on values, so that a CUDA graph can hold it: one token per
        row of `logits` (batch, vocab) by the inverse of the kept tokens' cumulative probabilities at
        `uniforms` [batch] in [0, 1) (None when greedy), and per row whether that draw must be redone with
        `choose` (None when it never must): a tie with the k-th score running past the candidates, which only
        the whole vocabulary can resolve. Same kept tokens and probabilities as `choose`; a different draw
        for the same seed."""
        logits = logits.float()
        if self.temperature == 0:
            return logits.argmax(dim=-1), None
        scores, indices, redo = self._draw_scores(logits)
        return self._pick(scores, indices, uniforms), redo

    def _draw_scores(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What `draw` draws from: the warped scores of the candidates, their ids and the rows to redo, or the
        warped scores of the whole vocabulary (ids and redo None)."""
        if self._few(logits.shape[-1]):
            return self._candidates(logits)
        return self._warpers(None, logits), None, None

    @staticmethod
    def _pick(scores: torch.Tensor, indices: torch.Tensor | None, uniforms: torch.Tensor) -> torch.Tensor:
        """Per row, the token whose share of the cumulative probability holds `uniforms` [rows]."""
        probs = torch.softmax(scores, dim=-1)
        cumulative = probs.cumsum(-1)
        pick = (cumulative <= uniforms[:, None] * cumulative[:, -1:]).sum(-1, keepdim=True)
        # u * total can round up to total: then the last kept token, never one of zero probability.
        kept = probs > 0
        last = (kept.shape[-1] - 1) - kept.flip(-1).int().argmax(-1, keepdim=True)
        pick = torch.minimum(pick, last)
        return (pick if indices is None else indices.gather(1, pick)).squeeze(1)

    def _few(self, vocab: int) -> bool:
        """Whether top-p and the draw run on the top_k + TIE_MARGIN highest scores only."""
        return 0 < self.top_k and self.top_k + TIE_MARGIN < vocab and vocab >= CANDIDATES_FROM_VOCAB

    def candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The warped scores of the top_k + TIE_MARGIN highest tokens and their ids ([batch, top_k + margin]
        each; removed ones at -inf), or None where a tie with the k-th score runs past them."""
        values, indices, overflow = self._candidates(logits)
        return None if bool(overflow.any()) else (values, indices)

    def _candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`candidates`' scores and ids, and per row whether a tie with the k-th score runs past them."""
        logits = logits.float()
        if self.temperature != 1.0:
            logits = self._warpers[0](None, logits)
        values, indices = logits.topk(min(self.top_k + TIE_MARGIN, logits.shape[-1]), dim=-1)
        kth = values[:, self.top_k - 1:self.top_k]
        if values.shape[-1] < logits.shape[-1]:
            overflow = (values[:, -1:] >= kth).squeeze(1)
        else:
            overflow = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
        # TopKLogitsWarper's rule on the candidates: every score below the k-th is removed.
        values = values.masked_fill(values < kth, -float("inf"))
        for warper in self._warpers:
            if isinstance(warper, TopPLogitsWarper):
                values = warper(None, values)
        return values, indices, overflow


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
    decode: str = "dynamic",
    probe: StepProbe | None = None,
    stack_dtype: torch.dtype | None = None,
    past: Sequence[DynamicCache | None] | None = None,
    keep_cache: bool = False,
) -> Generation:
    """Decode a left-padded batch until every sequence emits an EOS token or `max_new_tokens`.

    `layers` are the decoder layers whose hidden states the hook receives (none: the forward pass
    skips collecting them). Finished sequences are fed `pad_token_id` and hidden from the hook.
    `top_prob`: also hand the hook each row's top-token probability (a softmax over the vocabulary
    per step, so only when asked).
    `decode`: `dynamic` (HF's growing cache), `static` (a static cache; on CUDA each decode step is
    one CUDA-graph replay, see `inference/decoding/steps.py`) or `compiled` (`static` through torch.compile).
    All choose the same greedy tokens; a seeded sampled run draws other tokens on the static paths than on the
    dynamic one, where the step draws them itself (`DRAW_IN_STEP`).
    `probe`: run on the step's layer states inside the step (in the graph on the static path); its
    output reaches the hook as `StepView.scores`.
    `stack_dtype`: also stack the `layers`' states of every row in this dtype inside the step
    (`StepView.outputs.stacked`), for a hook that keeps them all (trace collection).
    `past`: per row, a one-row cache of the states of the tokens before its `input_ids` (None: none), as
    `keep_cache` returns them; the rows' positions go on after it, and only `input_ids` are prefilled
    (each row needs at least one real token there). `keep_cache`: return each row's cache (`Generation.caches`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    if decode not in DECODE_PATHS:
        raise ValueError(f"decode must be one of {', '.join(DECODE_PATHS)}, got {decode!r}")
    device = input_ids.device
    batch = input_ids.shape[0]
    num_layers = model.config.num_hidden_layers
    layer_ids = resolve_layers(layers, num_layers)
    if stack_dtype is not None and not (layers and hook is not None):
        raise ValueError("stack_dtype stacks the states of `layers` for a hook: give both")
    watched = list(layers) if (hook is not None or probe is not None) else []
    watched_ids = layer_ids if watched else []
    if past is not None and len(past) != batch:
        raise ValueError(f"past has {len(past)} caches for a batch of {batch} rows")
    attention_mask = attention_mask.to(device)
    held = BatchPast.of(list(past)) if past is not None else None
    if held is not None and not bool(attention_mask.bool()[:, -1].all()):
        raise ValueError("every row given a past needs a real token last in input_ids (left padding)")
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if held is not None:
        lengths_held = torch.tensor(held.lengths, device=device)
        positions = positions + lengths_held[:, None]
        columns = torch.arange(held.width, device=device)
        attention_mask = torch.cat([(columns[None] >= held.width - lengths_held[:, None]).to(attention_mask.dtype),
                                    attention_mask], dim=1)
    # Made inside the step (in the CUDA graph on the static path), for the hook to read.
    extras = {"top_prob": top_prob and hook is not None, "stack_dtype": stack_dtype}
    if decode in ("static", "compiled"):
        drawn = {"sampler": sampler, "generator": generator} if DRAW_IN_STEP else {}
        steps = StaticSteps(model, watched, watched_ids, attention_mask.shape[1] + max_new_tokens, probe=probe,
                            graph=device.type == "cuda", compile=decode == "compiled", **extras, **drawn)
    else:
        steps = DynamicSteps(model, watched, watched_ids, probe=probe, **extras)
    eos = torch.tensor(list(eos_token_ids), device=device)

    # The loop's bookkeeping stays on the device; the host waits once a step (whether any row is still live),
    # twice when a drawn token may need redrawing, and a hook's step also for its rows.
    live = torch.ones(batch, dtype=torch.bool, device=device)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)  # emitted EOS
    halted = torch.zeros(batch, dtype=torch.bool, device=device)  # stopped by the hook
    generated = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    pad = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)

    outputs = steps.prefill(input_ids, attention_mask, positions, past=held)
    positions = positions[:, -1:]
    step = 0
    for step in range(max_new_tokens):
        if outputs.tokens is None or outputs.redo is not None and bool(outputs.redo.any()):
            tokens = sampler.choose(outputs.logits, generator)
        else:
            tokens = outputs.tokens
        tokens = torch.where(live, tokens, pad)
        generated[:, step] = tokens  # a finished row's column stays padding
        lengths += live
        hit_eos = live & torch.isin(tokens, eos)
        stopped = None
        if hook is not None:
            rows = live.nonzero().squeeze(1)
            view = StepView(step, rows, tokens, outputs)
            stopped = hook(view)
            view.close()
        ended |= hit_eos
        live = live & ~hit_eos
        if stopped is not None:
            stop = torch.zeros_like(live)
            stop[rows] = stopped.to(device=device, dtype=torch.bool)
            halted |= stop & live
            live = live & ~stop
        if step + 1 == max_new_tokens or not bool(live.any()):
            break
        positions = positions + 1
        outputs = steps.step(tokens, positions)

    finish = [FINISH_EOS if eos_row else FINISH_STOPPED if halted_row else FINISH_BUDGET
              for eos_row, halted_row in zip(ended.tolist(), halted.tolist())]
    generated_ids = [generated[row, : lengths[row]].tolist() for row in range(batch)]
    prompt_lengths = attention_mask.sum(-1).tolist()
    caches = steps.row_caches([max(len(ids) - 1, 0) for ids in generated_ids]) if keep_cache else None
    return Generation(generated_ids, finish, steps=step + 1, prompt_lengths=prompt_lengths, caches=caches)

def eos_token_ids(tokenizer, model) -> list[int]:
    """Tokens that end a trace: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)
