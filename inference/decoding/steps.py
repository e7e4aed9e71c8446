"""How `generate` runs the model for one step: a dynamic cache, or a static cache whose decode step is
captured once in a CUDA graph and replayed.

Why a graph: on a GPU a decode step of a small batch is launch-bound. The HF forward issues about 63
kernels per decoder layer from Python (2,275 per step for the Qwen3-8B shape, most of them shorter
than 5 us), and issuing them takes longer than running them: the eager 8B step took 47.6 ms of wall
time for 12.2 ms of GPU work (`benchmarks/decode.py` profiles it). A CUDA graph records the kernels
of one step once and replays them with a single launch (11.1 ms). That needs every tensor of the
step at a fixed address and a fixed shape: a static KV cache sized for prompt + budget, a fixed-size
attention mask, and input buffers that each step writes into before the replay. The tiny kernels'
own GPU time remains; torch.compile fuses them (`compiled`: 8.3 ms).

Both steppers return, per step, a `StepOutputs` for every batch row: the last position's logits, the
configured layers' states and, when asked, what a watching hook needs from them (a `probe`'s scores, the
top-token probability, the states stacked in a storage dtype). These are made inside the step (in the
graph on the static path), so that watching a step costs one replay, not a second launch sequence.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache, StaticCache

DECODE_PATHS = ("dynamic", "static", "compiled")
"""`dynamic`: HF's DynamicCache, one eager forward per step. `static`: a StaticCache; on CUDA the decode
step is captured in a CUDA graph (on a CPU it runs eagerly, which is how tests check that both paths
choose the same tokens). `compiled`: `static` with the decode step through torch.compile first. A compile
costs 98 s for the Qwen3-8B shape in bf16 on the H100, 190 s with the fused 2-bit kernel (48 s and 165 s on an
H200), once per batch size and step shape in a process: its cache is sized up to a multiple of
`CACHE_BUCKET` positions, so calls of one batch size whose prompts and budgets differ (the controller's
rounds) reuse the compiled steps of the window sizes they share. A new batch size still compiles anew."""

MIN_WINDOW = 256
"""Fewest cache positions a windowed decode step attends over (see `StaticSteps`)."""

WINDOW_STEP = 1024
"""Past this many positions a captured window grows by this many at a time instead of doubling (see
`StaticSteps`); the compiled path keeps doubling, since each new window is a compile."""

CACHE_BUCKET = MIN_WINDOW
"""The compiled path's static cache holds a multiple of this many positions (fewer than this many past
prompt + budget), so that its step shapes repeat across calls."""

COMPILE_BACKEND = "inductor"
"""torch.compile's backend for the compiled path (tests count compiles with a counting backend)."""

StepProbe = Callable[[dict[int, torch.Tensor]], torch.Tensor]


@dataclass
class StepOutputs:
    """One step's outputs for every batch row, finished rows included (they hold what the padding fed to
    them produced). On the static path with a CUDA graph the same tensors are rewritten by every replay.

    `logits` [batch, vocab] at the last position; `hidden` {layer: [batch, hidden_size]}, the configured
    layers' outputs there; `scores` the probe's output on `hidden` (None without a probe); `top_prob`
    [batch] float32, the softmax of the raw logits' largest value (None unless asked); `stacked`
    [batch, len(layers), hidden_size], `hidden` stacked in layer order and cast to the stack dtype
    (None unless asked). `tokens` [batch], the next token of every row drawn inside the step, and `redo`
    [batch] bool, the rows whose draw `Sampler.choose` must redo (None unless a static path was given a
    sampler; `redo` also None when no draw can need it).
    """

    logits: torch.Tensor
    hidden: dict[int, torch.Tensor]
    scores: torch.Tensor | None = None
    top_prob: torch.Tensor | None = None
    stacked: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    redo: torch.Tensor | None = None


def cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.24 on (`past_key_values` still
    works there, with a deprecation warning every call), `past_key_values` before."""
    name = getattr(model, "_lowbit_cache_argument", None)
    if name is None:
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model._lowbit_cache_argument = name
    return name


@dataclass
class BatchPast:
    """What a batch's rows already hold: per decoder layer, keys and values [batch, kv heads, width, head dim],
    each row's states right-aligned (the columns before them copy its first state and are masked)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    lengths: list[int]

    @property
    def width(self) -> int:
        return self.layers[0][0].shape[2]

    @classmethod
    def of(cls, caches: list[DynamicCache | None]) -> "BatchPast | None":
        """The rows' caches (None: nothing held) left-padded into one batch; None where no row holds anything.
        The padding repeats each row's first state rather than zeros, so that a cache that counts its filled
        slots by nonzero keys counts every column."""
        lengths = [0 if cache is None else cache.get_seq_length() for cache in caches]
        width = max(lengths, default=0)
        if width == 0:
            return None
        reference = next(cache for cache, length in zip(caches, lengths) if length)
        layers = []
        for index, layer in enumerate(reference.layers):
            shape = list(layer.keys.shape)
            keys = layer.keys.new_zeros([len(caches), shape[1], width, shape[3]])
            values = layer.values.new_zeros([len(caches), shape[1], width, layer.values.shape[3]])
            for row, (cache, length) in enumerate(zip(caches, lengths)):
                if not length:
                    continue
                held = cache.layers[index]
                keys[row, :, width - length:] = held.keys[0, :, :length]
                values[row, :, width - length:] = held.values[0, :, :length]
                keys[row, :, :width - length] = held.keys[0, :, :1]
                values[row, :, :width - length] = held.values[0, :, :1]
            layers.append((keys, values))
        return cls(layers, lengths)


def _row_caches(layers, real: torch.Tensor, fed: list[int], prefilled: int) -> list[DynamicCache]:
    """Per row, a cache of one row: the columns of `real` [batch, columns] set among the first `prefilled`,
    then the next `fed[row]` columns (decode positions, all real for a row that was still generating)."""
    caches = []
    for row, count in enumerate(fed):
        columns = torch.cat([real[row, :prefilled].nonzero().squeeze(1),
                             torch.arange(prefilled, prefilled + count, device=real.device)])
        cache = DynamicCache()
        for index, layer in enumerate(layers):
            cache.update(layer.keys[row:row + 1, :, columns].clone(), layer.values[row:row + 1, :, columns].clone(),
                         index)
        caches.append(cache)
    return caches


class DynamicSteps:
    """HF's own path: the cache grows, every step is an eager forward with a growing 2D mask."""

    def __init__(self, model, layers: list[int], layer_ids: list[int], probe: StepProbe | None = None,
                 top_prob: bool = False, stack_dtype: torch.dtype | None = None):
        self.model, self.layers, self.layer_ids, self.probe = model, layers, layer_ids, probe
        self.top_prob, self.stack_dtype = top_prob, stack_dtype
        self.cache = DynamicCache(config=model.config)

    def _run(self, input_ids, attention_mask, positions) -> StepOutputs:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             **{cache_argument(self.model): self.cache}, use_cache=True,
                             output_hidden_states=bool(self.layers), logits_to_keep=1)
        logits, hidden, scores = _unpack(outputs, self.layers, self.layer_ids, self.probe)
        return _step_outputs(logits, hidden, scores, self.layers, self.top_prob, self.stack_dtype)

    def prefill(self, input_ids, attention_mask, positions, past: "BatchPast | None" = None):
        """`attention_mask` covers `past`'s positions, then `input_ids`'."""
        if past is not None:
            for layer, (keys, values) in enumerate(past.layers):
                self.cache.update(keys, values, layer)
        self.mask, self._prefilled = attention_mask, attention_mask.shape[1]
        return self._run(input_ids, attention_mask, positions)

    def row_caches(self, fed: list[int]) -> list[DynamicCache]:
        """Each row's states as a cache of its own: the real positions of the prefill, then the first `fed[row]`
        decode positions."""
        return _row_caches(self.cache.layers, self.mask.bool(), fed, self._prefilled)

    def step(self, tokens, positions):
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self._run(tokens[:, None], self.mask, positions)


class StaticSteps:
    """A StaticCache of `prompt + max_new_tokens` positions and a 4D boolean mask of that width.

    Cache slot `prompt_length + s` holds the token fed at decode step s, for every row (the batch is
    left-padded, so rows advance together). The mask row of each sequence opens its prompt's real
    tokens and every slot written so far; a padded prompt position attends only to itself, which keeps
    its states finite (they are never attended to by a real token).
    With `graph=True` (CUDA only) decode step 0 runs eagerly (warming up kernels and allocators), step
    1 is captured and every later step is a replay over the same buffers.

    `windowed`: a decode step attends over the first `window` cache positions only, instead of over the
    whole cache: the slots past the last one written are masked out anyway, and reading them is most of
    attention's cost when the budget is long. The window is the least power of two (at least
    `min_window`, at most the cache) that holds every slot written so far; past `window_step` positions
    (WINDOW_STEP unless compiled; None: always doubling) the least multiple of `window_step` instead.

    `sampler` (a `Sampler`): every step, the prefill's too, also draws each row's next token
    (`Sampler.draw`, into `StepOutputs.tokens`), inside the graph on the decode path, from uniforms that
    `generator` fills before each step; the caller then launches no sampling kernels of its own.
    Each new window is one more eager step and one more captured graph (the one before is dropped and
    its memory handed back, as is the batch before's when the next one starts):
    about 11 over a budget of 8,192. Doubling alone left late steps attending over up to twice the
    written slots, and the split-cache kernel still walks the masked blocks it does not load (an H200,
    86 rows of Qwen3-0.6B, 4,096 of 8,192 positions written: 585 us a layer over the window, 331 us
    over the written part; `benchmarks/attention_mask.py`).
    """

    def __init__(self, model, layers: list[int], layer_ids: list[int], max_length: int,
                 probe: StepProbe | None = None, graph: bool = False, compile: bool = False,
                 top_prob: bool = False, stack_dtype: torch.dtype | None = None, windowed: bool = True,
                 min_window: int = MIN_WINDOW, window_step: int | None | str = "auto", sampler=None,
                 generator: torch.Generator | None = None):
        self.model, self.layers, self.layer_ids, self.probe = model, layers, layer_ids, probe
        self.sampler, self.generator = sampler, generator
        self._uniforms: torch.Tensor | None = None
        self.top_prob, self.stack_dtype = top_prob, stack_dtype
        if compile:
            max_length = -(-max_length // CACHE_BUCKET) * CACHE_BUCKET
        self.max_length = max_length
        self.cache = WindowedStaticCache(config=model.config, max_cache_len=max_length)
        self.graph = graph
        self.windowed, self.min_window = windowed, min_window
        self.window_step = (None if compile else WINDOW_STEP) if window_step == "auto" else window_step
        self._graph: torch.cuda.CUDAGraph | None = None
        self._warm = False  # whether the current window's decode step has run eagerly once
        self._steps = 0
        self._decode = _compiled_step() if compile else _step
        if graph:
            _release_cached()  # the graphs and cache of the batch before, so that reserved memory is what is live

    def window_for(self, slot: int) -> int:
        """Cache positions a decode step writing `slot` attends over (all of them unless windowed)."""
        if not self.windowed:
            return self.max_length
        window = max(self.min_window, 1 << slot.bit_length())
        if self.window_step and window > self.window_step:
            window = -(-(slot + 1) // self.window_step) * self.window_step
        return min(self.max_length, window)

    def _run(self, input_ids, positions, decode: bool = False) -> StepOutputs:
        step = self._decode if decode else _step
        mask = self.mask
        if decode:
            window = self.cache.window
            mask = mask[..., :window]  # a view: the graph reads the mask written before each replay
        logits, hidden, scores = step(self.model, input_ids, mask, positions, self.cache, tuple(self.layers),
                                      tuple(self.layer_ids), self.probe)
        # Outside torch.compile, so that `compiled` stores what `static` would store for the same states.
        outputs = _step_outputs(logits, hidden, scores, self.layers, self.top_prob, self.stack_dtype)
        if self.sampler is not None:
            outputs.tokens, outputs.redo = self.sampler.draw(logits, self._uniforms)
        return outputs

    def _fill_uniforms(self, batch: int, device: torch.device) -> None:
        """The uniforms of the next draw, written into the buffer the step (or its graph) reads."""
        if self.sampler is None or self.sampler.temperature == 0:
            return
        if self._uniforms is None:
            self._uniforms = torch.empty(batch, device=device)
        self._uniforms.uniform_(0.0, 1.0, generator=self.generator)

    def prefill(self, input_ids, attention_mask, positions, past: "BatchPast | None" = None):
        """`attention_mask` covers `past`'s positions (written to the cache's first slots first), then
        `input_ids`'."""
        batch, length = input_ids.shape
        prompt = attention_mask.shape[1]
        held = prompt - length
        if prompt >= self.max_length:
            raise ValueError(f"a prompt of {prompt} tokens leaves no room in a static cache of {self.max_length}")
        device = input_ids.device
        real = attention_mask.to(device=device, dtype=torch.bool)
        if past is not None:
            slots = torch.arange(held, device=device)
            for layer, (keys, values) in enumerate(past.layers):
                self.cache.update(keys, values, layer, {"cache_position": slots})
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        square = (causal[None] & real[:, None, held:]) | torch.eye(length, dtype=torch.bool, device=device)[None]
        prefill_mask = torch.zeros(batch, 1, length, self.max_length, dtype=torch.bool, device=device)
        prefill_mask[:, 0, :, :held] = real[:, None, :held]
        prefill_mask[:, 0, :, held:prompt] = square
        self.mask = prefill_mask
        self._fill_uniforms(batch, device)
        result = self._run(input_ids, positions)
        self.mask = torch.zeros(batch, 1, 1, self.max_length, dtype=torch.bool, device=device)
        self.mask[:, 0, 0, :prompt] = real
        self.prompt = prompt
        self._ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self._positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        return result

    def row_caches(self, fed: list[int]) -> list[DynamicCache]:
        """Each row's states as a cache of its own: the real positions of the prefill, then the first `fed[row]`
        decode slots."""
        return _row_caches(self.cache.layers, self.mask[:, 0, 0], fed, self.prompt)

    def step(self, tokens, positions):
        slot = self.prompt + self._steps
        if slot >= self.max_length:
            raise ValueError(f"decode step {self._steps} is past the static cache of {self.max_length} positions")
        self.mask[:, 0, 0, slot] = True
        self._ids.copy_(tokens[:, None])
        self._positions.copy_(positions)
        self._fill_uniforms(tokens.shape[0], tokens.device)
        self._steps += 1
        window = self.window_for(slot)
        if window != self.cache.window:  # a new window: new shapes, so warm up and capture again
            self.cache.window = window
            self._graph, self._warm = None, False
            if self.graph:
                self._outputs = None
                _release_cached()  # the dropped graph's private pool
        if not self.graph:
            return self._run(self._ids, self._positions, decode=True)
        if not self._warm:
            self._warm = True
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                result = self._run(self._ids, self._positions, decode=True)
            torch.cuda.current_stream().wait_stream(stream)
            return result
        if self._graph is None:
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._outputs = self._run(self._ids, self._positions, decode=True)
        self._graph.replay()
        return self._outputs


def _release_cached() -> None:
    """Hand the CUDA caching allocator's unused blocks back to the driver, the private pools of dropped
    graphs among them.

    A dropped graph's pool is only released by `torch.cuda.empty_cache` (or when an allocation would
    otherwise fail). On an H200, three batches of 86 rows of Qwen3-0.6B at 8,192 (33 windows) reserved
    139.9 GB, 93% of the card, for 99.6 GB allocated without this, and 105.8 GB (70.5%) with it
    (`docs/results.md`, "Reserved memory handed back")."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


class WindowedStaticCache(StaticCache):
    """A StaticCache whose `update` returns the first `window` positions of a layer's keys and values
    (views of the whole buffers, which it still writes), or all of them while `window` is None."""

    window: int | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.window is None:
            return keys, values
        return keys[:, :, :self.window], values[:, :, :self.window]


def _step(model, input_ids, mask, positions, cache, layers, layer_ids, probe):
    """One forward over a static cache: last position's logits, watched states, probe output."""
    outputs = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                    **{cache_argument(model): cache}, use_cache=True, output_hidden_states=bool(layers),
                    logits_to_keep=1)
    return _unpack(outputs, layers, layer_ids, probe)


_COMPILED = None


def _compiled_step():
    """`_step` through torch.compile (inductor fuses the small elementwise kernels of every layer:
    norms, rotary embedding, residual adds, activation), shared by every StaticSteps so that a model
    compiles once per batch size and step shape."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_step, dynamic=False, backend=COMPILE_BACKEND)
    return _COMPILED


def _step_outputs(logits, hidden, scores, layers, top_prob: bool, stack_dtype: torch.dtype | None) -> StepOutputs:
    """What a watching hook asked for, made from the step's outputs for every row."""
    confidence = torch.softmax(logits.float(), dim=-1).amax(dim=-1) if top_prob else None
    stacked = None
    if stack_dtype is not None:
        stacked = torch.stack([hidden[layer] for layer in layers], dim=1).to(stack_dtype)
    return StepOutputs(logits, hidden, scores, confidence, stacked)


def _unpack(outputs, layers, layer_ids, probe):
    logits = outputs.logits[:, -1, :]
    # hidden_states[0] is the embedding output; layer i's output is hidden_states[i + 1].
    hidden = {layer: outputs.hidden_states[index + 1][:, -1, :] for layer, index in zip(layers, layer_ids)}
    scores = probe(hidden) if probe is not None else None
    return logits, hidden, scores
