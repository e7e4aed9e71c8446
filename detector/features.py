"""The detector's feature recipe: what the probe reads at one generated position.

Input, per trace: `hidden` [captured, n_layers, hidden_size] (float16/bfloat16, the configured layers'
output states at the captured generated positions, as a trace set stores them) and `positions`
[captured] (their generated-token indices, increasing).

Output: `features` [captured, feature_dim] float32, per position the concatenation of
- the standardised states of every layer, `(h - mean[layer]) / std[layer]` per channel, the
  statistics fitted on the training traces' captured positions (`NormalisationStats`):
  n_layers * hidden_size values;
- if `mean_window` W > 0, the running mean: the mean of the standardised states at the last
  n = max(1, W // stride) positions of the capture grid (generated positions divisible by the trace
  set's capture `stride`) at or before t (fewer at the start of a trace): another
  n_layers * hidden_size values.

Why the grid: trace sets also keep dense windows of states around label events (loop onset, first
answer, `</think>`), so "every captured state of the last W tokens" would average 4x more states
near an event than elsewhere, a smoothness the probe could read the labels from. Grid states exist
at the same spacing everywhere, and a trigger during decoding reproduces them exactly by keeping the
state of every stride-th token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class FeatureRecipe:
    """How hidden states become probe features (recorded in the detector card)."""

    layers: tuple[int, ...]
    """Configured decoder layers, in the order the trace set stores them (negative from the end)."""
    hidden_size: int
    mean_window: int = 0
    """W: tokens covered by the running-mean features; 0 leaves them out."""
    stride: int = 1
    """Spacing of the capture grid the running mean reads (the training trace set's capture stride)."""

    @property
    def mean_states(self) -> int:
        """n: grid states averaged into the running mean."""
        return max(1, self.mean_window // self.stride)

    @property
    def feature_dim(self) -> int:
        per_position = len(self.layers) * self.hidden_size
        return per_position * (2 if self.mean_window else 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers), "feature_dim": self.feature_dim,
                "mean_states": self.mean_states if self.mean_window else 0,
                "normalisation": "per layer and channel: (h - mean) / std over the training traces' captured positions"}

    @classmethod
    def from_dict(cls, record: dict) -> FeatureRecipe:
        return cls(layers=tuple(record["layers"]), hidden_size=int(record["hidden_size"]),
                   mean_window=int(record.get("mean_window", 0)), stride=int(record.get("stride", 1)))


@dataclass
class NormalisationStats:
    """Per-layer, per-channel mean and standard deviation, each [n_layers, hidden_size] float32."""

    mean: torch.Tensor
    std: torch.Tensor

    # Channels that never vary in training (std ~ 0) are centred, not blown up.
    MIN_STD = 1e-4


class StatsAccumulator:
    """Running sums for `NormalisationStats` over any number of [n, n_layers, hidden_size] blocks
    (float64, so one pass over a trace set larger than memory gives exact statistics)."""

    def __init__(self, n_layers: int, hidden_size: int):
        self.count = 0
        self.total = torch.zeros(n_layers, hidden_size, dtype=torch.float64)
        self.squares = torch.zeros(n_layers, hidden_size, dtype=torch.float64)

    def add(self, hidden: torch.Tensor) -> None:
        block = hidden.to(torch.float64)
        self.count += block.shape[0]
        self.total += block.sum(dim=0)
        self.squares += (block * block).sum(dim=0)

    def stats(self) -> NormalisationStats:
        if self.count == 0:
            raise ValueError("no captured positions to fit normalisation statistics on")
        mean = self.total / self.count
        variance = (self.squares / self.count - mean * mean).clamp_min(0.0)
        std = variance.sqrt().clamp_min(NormalisationStats.MIN_STD)
        return NormalisationStats(mean=mean.float(), std=std.float())


def running_mean(states: torch.Tensor, positions: torch.Tensor, stride: int, count: int) -> torch.Tensor:
    """Per row i, the mean of `states` at the last `count` rows on the capture grid (positions divisible
    by `stride`) with positions <= positions[i]; zeros where none is.

    `states` [n, ...] of one trace, `positions` [n] increasing; returns [n, ...] float32.
    """
    n = states.shape[0]
    flat = states.reshape(n, -1).float()
    grid = positions % stride == 0
    grid_states, grid_positions = flat[grid], positions[grid].contiguous()
    cumulative = torch.cat([torch.zeros(1, flat.shape[1], device=flat.device), grid_states.cumsum(dim=0)], dim=0)
    last = torch.searchsorted(grid_positions, positions.contiguous(), right=True)
    first = (last - count).clamp_min(0)
    counts = (last - first).clamp_min(1).unsqueeze(1).float()
    return ((cumulative[last] - cumulative[first]) / counts).reshape(states.shape)


def trace_features(hidden: torch.Tensor, positions: torch.Tensor, recipe: FeatureRecipe,
                   stats: NormalisationStats, out: torch.Tensor | None = None) -> torch.Tensor:
    """Features [captured, recipe.feature_dim] float32 of one trace (see the module docstring).

    `out`: a [captured, feature_dim] float32 tensor to write them into (rows of a shard's buffer), so that
    a shard's features are built without a second copy; the values are the same either way."""
    if hidden.dim() != 3 or tuple(hidden.shape[1:]) != (len(recipe.layers), recipe.hidden_size):
        raise ValueError(f"hidden states of shape {tuple(hidden.shape)} do not match the feature recipe "
                         f"({len(recipe.layers)} layers x {recipe.hidden_size})")
    n, states = hidden.shape[0], len(recipe.layers) * recipe.hidden_size
    if out is None:
        out = torch.empty(n, recipe.feature_dim, device=hidden.device)
    normalised = out[:, :states].view(hidden.shape)
    torch.sub(hidden.float(), stats.mean, out=normalised)
    normalised.div_(stats.std)
    if recipe.mean_window:
        out[:, states:] = running_mean(normalised, positions.long(), recipe.stride, recipe.mean_states).reshape(n, -1)
    return out


class StreamingFeatures:
    """The same features one decoding step at a time, for a trigger that sees every token of a batch.

    `step(position, hidden)` takes the newest token's generated position and its states
    [batch, n_layers, hidden_size] and returns features [batch, feature_dim]; rows of a batch advance
    together. The running mean keeps the states of every `recipe.stride`-th position (the capture grid
    training saw), so scoring only at grid positions reproduces `trace_features` exactly.
    """

    def __init__(self, recipe: FeatureRecipe, stats: NormalisationStats):
        self.recipe, self.stats = recipe, stats
        self.grid_states: list[torch.Tensor] = []
        self.grid_positions: list[int] = []

    def truncated(self, length: int) -> StreamingFeatures:
        """A copy that keeps only the grid states of generated positions below `length` (a trace cut back
        there keeps the states of the tokens it kept)."""
        copy = StreamingFeatures(self.recipe, self.stats)
        kept = [i for i, position in enumerate(self.grid_positions) if position < length]
        copy.grid_states = [self.grid_states[i] for i in kept]
        copy.grid_positions = [self.grid_positions[i] for i in kept]
        return copy

    def step(self, position: int, hidden: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats.mean.to(hidden.device), self.stats.std.to(hidden.device)
        normalised = (hidden.float() - mean) / std
        batch = hidden.shape[0]
        parts = [normalised.reshape(batch, -1)]
        if self.recipe.mean_window:
            if position % self.recipe.stride == 0:
                self.grid_states = [*self.grid_states, normalised][-self.recipe.mean_states :]
                self.grid_positions = [*self.grid_positions, position][-self.recipe.mean_states :]
            if self.grid_states:
                parts.append(torch.stack(self.grid_states).mean(dim=0).reshape(batch, -1))
            else:
                parts.append(torch.zeros_like(parts[0]))
        return torch.cat(parts, dim=1)
