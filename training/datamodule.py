"""The detector's data: captured positions of labeled trace sets, streamed one shard at a time.

`TraceDataModule` reads a training trace set and, optionally, a separate validation trace set.
Without one, it holds out `detector.val_fraction` of the training set's *problems* (every sample of a
problem lands on the same side, so no problem is in both splits). It never holds a whole trace set in
memory: `setup` makes one pass over the shards (checksums, normalisation statistics, label counts)
and the loaders then read one shard at a time through safetensors' lazy `safe_open`, so a trace set
larger than RAM still trains. With `detector.num_workers` worker processes and fewer shards than
workers (a large model writes few, large shards), each shard is split into runs of consecutive traces,
each worker reading only its traces' rows, so that every worker has work. Where the probe trains on a GPU
(`detector.feature_device: auto`), the features are built there from the stored float16 states: a shard
is read in runs of traces of at most `GPU_PLAN_BYTES` of features, moved to the GPU as stored, normalised,
averaged and shuffled there, and the batches are GPU tensors (no worker processes). The normalisation is
the same arithmetic on either device; the running mean's sums may round differently in the last bit.

A batch is `(features [B, feature_dim] float32, targets [B, len(HEADS)] float32)`, one row per
captured position, targets in `detector.probe.HEADS` order, from `training.labels.position_targets`
(with `labels.horizon` of the config), the trace's `correct` label (`ends_wrong`) and
`training.labels.candidate_targets` (`answer_correct`, NaN where no candidate was just stated) and
`training.labels.step_targets` (`step_wrong`, NaN except at the token closing an arithmetic step). Training batches are shuffled within a buffer of shards (shard order
reshuffled each epoch); validation batches come in trace order.

Refused (one line, `TraceSetError`): a trace set without `labels.json` or with traces it does not
cover; one collected for another model, hidden size or layer list than the config's; a trace set in
which *no* head has both positive and negative positions in both splits. A head that lacks one class
in a split (larger models loop or fail to commit rarely) is listed in `untrained_heads` with the
reason: it gets no loss weight, no metrics and no alarm, and the other head trains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from detector.features import FeatureRecipe, NormalisationStats, StatsAccumulator, trace_features
from detector.probe import HEADS
from inference.config import RescueConfig
from inference.errors import ModelUnavailableError
from inference.storage import file_sha256
from training.labels import TraceLabels, candidate_targets, position_targets, step_targets
from training.traces import LABELS, MANIFEST, TraceSet, TraceSetError

# Features held at once while shuffling training positions (several shards' worth for small models).
SHUFFLE_BUFFER_BYTES = 256 << 20
# Features one run of traces may hold on the GPU (larger shards are read in several runs).
GPU_PLAN_BYTES = 2 << 30


@dataclass
class ShardPlan:
    """The rows of one shard that belong to one split."""

    path: Path
    rows: list[int]
    trace_ids: list[str]
    labels: list[TraceLabels]

    def part(self, start: int, end: int) -> ShardPlan:
        """The plan of its traces start..end-1 (the same shard, only their rows)."""
        return ShardPlan(path=self.path, rows=self.rows[start:end], trace_ids=self.trace_ids[start:end],
                         labels=self.labels[start:end])


@dataclass
class TraceExample:
    """One trace's features and targets, for calibration and offline evaluation."""

    trace_id: str
    problem_id: str
    positions: torch.Tensor
    """[captured] int64 generated positions."""
    features: torch.Tensor
    """[captured, feature_dim] float32."""
    targets: torch.Tensor
    """[captured, len(HEADS)] float32 in `HEADS` order (NaN: no target at that position)."""
    labels: TraceLabels
    generated_ids: torch.Tensor
    """[generated] int32 token ids (for replaying token-level rules)."""
    top_prob: torch.Tensor | None = None
    """[generated] float32 top-token probabilities (for the confidence rule); None in schema-1 trace sets."""

    @property
    def healthy(self) -> bool:
        """No loop and a committed answer: the traces a false alarm is counted on."""
        return self.labels.loop_onset is None and not self.labels.fails_to_commit


def model_hidden_size(config: RescueConfig) -> int | None:
    """The configured model's hidden size from its config.json, or None where the model is not at hand."""
    from inference.decoding.models import resolve_model_source

    try:
        folder = resolve_model_source(config.model.fp16, "model")
        record = json.loads((folder / "config.json").read_text())
    except (ModelUnavailableError, OSError, json.JSONDecodeError):
        return None
    size = record.get("hidden_size", record.get("text_config", {}).get("hidden_size"))
    return int(size) if size else None


def manifest_sha256(folder: str | Path) -> str:
    return file_sha256(Path(folder) / MANIFEST)


def read_shard(path: Path, with_hidden: bool = True) -> dict[str, Any]:
    """The tensors a probe needs from one shard (lazily: only those asked for are read)."""
    with safe_open(str(path), framework="pt") as handle:
        shard = {"rows": json.loads(handle.metadata()["traces"]),
                 "positions": handle.get_tensor("positions").long(),
                 "capture_offsets": handle.get_tensor("capture_offsets"),
                 "generated_ids": handle.get_tensor("generated_ids"),
                 "generated_offsets": handle.get_tensor("generated_offsets")}
        if "top_prob" in handle.keys():
            shard["top_prob"] = handle.get_tensor("top_prob")
        if with_hidden:
            shard["hidden"] = handle.get_tensor("hidden")
    return shard


def load_labels(folder: str | Path) -> tuple[dict[str, TraceLabels], dict[str, Any]]:
    """labels.json of a trace set: labels per trace id, and the label parameters used."""
    path = Path(folder) / LABELS
    if not path.is_file():
        raise TraceSetError(f"{folder}: no {LABELS}; label the trace set first with `rescue label {folder}`")
    try:
        record = json.loads(path.read_text())
        labels = {trace_id: TraceLabels.from_dict(value) for trace_id, value in record["traces"].items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise TraceSetError(f"{path}: not a readable labels file ({type(error).__name__}); "
                            f"rerun `rescue label {folder}`") from None
    return labels, record.get("params", {})


def _problem_rank(problem_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{problem_id}".encode()).digest()[:8], "little")


def split_problems(problem_ids: list[str], val_fraction: float, seed: int) -> set[str]:
    """The problems held out for validation: a seeded hash order, at least one problem on each side."""
    unique = sorted(set(problem_ids))
    if len(unique) < 2:
        raise TraceSetError(f"need traces of at least 2 problems to hold some out for validation, got {len(unique)}; "
                            "pass a separate validation trace set with --val")
    count = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    return set(sorted(unique, key=lambda p: _problem_rank(p, seed))[:count])


class _PositionStream(IterableDataset):
    """Batches of (features, targets) from a list of shard plans, one shard read at a time."""

    def __init__(self, plans: list[ShardPlan], recipe: FeatureRecipe, stats: NormalisationStats, horizon: int,
                 batch_size: int, shuffle: bool, device: str | torch.device = "cpu"):
        self.plans, self.recipe, self.horizon = plans, recipe, horizon
        self.batch_size, self.shuffle, self.device = batch_size, shuffle, torch.device(device)
        self.stats = stats if self.device.type == "cpu" else NormalisationStats(
            mean=stats.mean.to(self.device), std=stats.std.to(self.device))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        plans = self.plans if worker is None else self.plans[worker.id :: worker.num_workers]
        if not self.shuffle:
            for plan in plans:
                for features, targets in _plan_examples(plan, self.recipe, self.stats, self.horizon, self.device):
                    for start in range(0, features.shape[0], self.batch_size):
                        yield features[start : start + self.batch_size], targets[start : start + self.batch_size]
            return
        # Main process: the global generator (seeded by Lightning); a worker: its per-epoch seed.
        # Persistent workers keep their seed across epochs, hence the epoch count.
        self._epochs = getattr(self, "_epochs", 0) + 1
        seed = int(torch.randint(0, 2**62, ()).item()) if worker is None else worker.seed + 7919 * self._epochs
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(plans), generator=generator).tolist()
        buffer_rows = max(self.batch_size, SHUFFLE_BUFFER_BYTES // (4 * self.recipe.feature_dim))
        held: list[tuple[torch.Tensor, torch.Tensor]] = []
        held_rows = 0
        for index in order:
            for features, targets in _plan_examples(plans[index], self.recipe, self.stats, self.horizon, self.device):
                held.append((features, targets))
                held_rows += features.shape[0]
            if held_rows >= buffer_rows:
                yield from self._shuffled(held, generator)
                held, held_rows = [], 0
        if held:
            yield from self._shuffled(held, generator)

    def _shuffled(self, held, generator):
        # One shard's buffer (a large model's shard holds more positions than the shuffle buffer) is
        # permuted where it is, not copied first.
        features = held[0][0] if len(held) == 1 else torch.cat([f for f, _ in held])
        targets = held[0][1] if len(held) == 1 else torch.cat([t for _, t in held])
        permutation = torch.randperm(features.shape[0], generator=generator).to(features.device)
        for start in range(0, features.shape[0], self.batch_size):
            chosen = permutation[start : start + self.batch_size]
            yield features[chosen], targets[chosen]


def _targets(labels: TraceLabels, positions: torch.Tensor, horizon: int) -> torch.Tensor:
    loop_within_h, fails_to_commit = position_targets(labels, horizon)
    loop = torch.from_numpy(loop_within_h[positions.numpy()].astype(np.float32))
    candidate = torch.from_numpy(candidate_targets(labels, positions.numpy()))
    step = torch.from_numpy(step_targets(labels, positions.numpy()))
    return torch.stack([loop, torch.full_like(loop, float(fails_to_commit)),
                        torch.full_like(loop, float(not labels.correct)), candidate, step], dim=1)


def _plan_traces(plan: ShardPlan, recipe: FeatureRecipe, stats: NormalisationStats,
                 horizon: int) -> Iterator[TraceExample]:
    shard = read_shard(plan.path)
    offsets = shard["capture_offsets"]
    for row, trace_id, trace_labels in zip(plan.rows, plan.trace_ids, plan.labels):
        c0, c1 = int(offsets[row]), int(offsets[row + 1])
        g0, g1 = int(shard["generated_offsets"][row]), int(shard["generated_offsets"][row + 1])
        positions = shard["positions"][c0:c1]
        yield TraceExample(trace_id=trace_id, problem_id=shard["rows"][row]["problem_id"], positions=positions,
                           features=trace_features(shard["hidden"][c0:c1], positions, recipe, stats),
                           targets=_targets(trace_labels, positions, horizon), labels=trace_labels,
                           generated_ids=shard["generated_ids"][g0:g1],
                           top_prob=shard["top_prob"][g0:g1] if "top_prob" in shard else None)


def _split_plans(plans: list[ShardPlan], parts: int) -> list[ShardPlan]:
    """Each plan as up to `parts` plans of consecutive traces (each reads only its traces' rows)."""
    split = []
    for plan in plans:
        size = -(-len(plan.rows) // parts)
        split += [plan.part(i, i + size) for i in range(0, len(plan.rows), size)]
    return split


def _split_plans_by_bytes(plans: list[ShardPlan], feature_dim: int, limit: int) -> list[ShardPlan]:
    """Each plan as runs of consecutive traces whose features (float32) take at most `limit` bytes (a trace
    larger than that is a run of its own)."""
    split = []
    for plan in plans:
        shard = read_shard(plan.path, with_hidden=False)
        offsets = shard["capture_offsets"]
        start, held = 0, 0
        for index, row in enumerate(plan.rows):
            size = 4 * feature_dim * int(offsets[row + 1] - offsets[row])
            if index > start and held + size > limit:
                split.append(plan.part(start, index))
                start, held = index, 0
            held += size
        if plan.rows:
            split.append(plan.part(start, len(plan.rows)))
    return split


def _plan_examples(plan, recipe, stats, horizon, device: torch.device = torch.device("cpu")
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The plan's positions as one (features, targets) pair, the features written trace by trace into one
    buffer (the values `trace_features` gives each trace, in trace order), on `device` (`stats` there too)."""
    if not plan.rows:
        return
    with safe_open(str(plan.path), framework="pt") as handle:
        offsets = handle.get_tensor("capture_offsets")
        spans = [(int(offsets[row]), int(offsets[row + 1])) for row in plan.rows]
        low = spans[0][0]
        all_positions = handle.get_tensor("positions").long()
        hidden = handle.get_slice("hidden")[low : spans[-1][1]]  # only the rows of the plan's traces
    hidden, all_positions = hidden.to(device), all_positions.to(device)  # no copy on the CPU
    features = torch.empty(sum(c1 - c0 for c0, c1 in spans), recipe.feature_dim, device=device)
    targets, at = [], 0
    for (c0, c1), trace_labels in zip(spans, plan.labels):
        positions = all_positions[c0:c1]
        trace_features(hidden[c0 - low : c1 - low], positions, recipe, stats, out=features[at : at + c1 - c0])
        targets.append(_targets(trace_labels, positions.cpu(), horizon))
        at += c1 - c0
    yield features, torch.cat(targets).to(device)


class TraceDataModule(L.LightningDataModule):
    """Train/validation positions of one or two labeled trace sets (module docstring).

    After `setup()`: `recipe` (`FeatureRecipe`), `stats` (`NormalisationStats` of the training split),
    `counts` (per split: traces, positions, positive positions per head), `pos_weight` (per head,
    negatives / positives on the training split), `sources` (path, manifest SHA-256 and size of each
    trace set), `label_params` (labels.json parameters of the training set), `identity` (the training
    manifest's identity), `capture_stride`.
    """

    def __init__(self, config: RescueConfig, traces: str | Path, val: str | Path | None = None,
                 hidden_size: int | None = None):
        super().__init__()
        self.config = config
        self.train_folder = Path(traces)
        self.val_folder = Path(val) if val is not None else None
        # The model's hidden size the traces must have; by default read from the model's config.json
        # (no check against the model where it is not at hand, e.g. a hub id not downloaded here).
        self.expected_hidden_size = hidden_size if hidden_size is not None else model_hidden_size(config)
        self._ready = False

    # -- checks --------------------------------------------------------------------------------

    def _open(self, folder: Path) -> tuple[TraceSet, dict[str, TraceLabels], dict[str, Any]]:
        trace_set = TraceSet(folder)
        if not trace_set.manifest.shards:
            raise TraceSetError(f"{folder}: the trace set holds no finished shards")
        labels, params = load_labels(folder)
        identity = trace_set.identity
        model = identity.get("model", {})
        config = self.config
        if model.get("name") != config.model.name:
            raise TraceSetError(f"{folder}: collected with model {model.get('name')!r}, but the config is for "
                                f"{config.model.name!r}")
        if list(identity.get("layers", [])) != list(config.probe.layers):
            raise TraceSetError(f"{folder}: captured layers {identity.get('layers')}, but the config's probe.layers "
                                f"are {list(config.probe.layers)}")
        if self.expected_hidden_size is not None and model.get("hidden_size") != self.expected_hidden_size:
            raise TraceSetError(f"{folder}: hidden size {model.get('hidden_size')}, but {config.model.name} has "
                                f"hidden size {self.expected_hidden_size}")
        return trace_set, labels, params

    def _index(self, trace_set: TraceSet, labels: dict[str, TraceLabels]) -> list[tuple[Path, list[dict]]]:
        """Every shard, checksum-verified once, with its per-trace rows; checks shapes and label coverage."""
        index = []
        expected = [len(self.config.probe.layers), self.recipe_hidden_size]
        for entry in sorted(trace_set.manifest.shards, key=lambda s: s.index):
            path = trace_set.verify(entry)
            with safe_open(str(path), framework="pt") as handle:
                rows = json.loads(handle.metadata()["traces"])
                shape = list(handle.get_slice("hidden").get_shape())
            if len(shape) != 3 or shape[1:] != expected:
                raise TraceSetError(f"{path}: hidden states of shape {shape}, expected [captured, {expected[0]}, "
                                    f"{expected[1]}] (layers x hidden size of the manifest)")
            missing = [row["id"] for row in rows if row["id"] not in labels]
            if missing:
                raise TraceSetError(f"{trace_set.folder}: {LABELS} has no labels for trace {missing[0]!r} "
                                    f"({len(missing)} unlabeled); rerun `rescue label {trace_set.folder}`")
            ungraded = [row["id"] for row in rows if not str(row.get("gold") or "").strip()]
            if ungraded:
                raise TraceSetError(f"{path}: trace {ungraded[0]!r} has no gold answer; the correctness heads "
                                    "(ends_wrong, answer_correct) need a benchmark with gold answers")
            index.append((path, [{**row, "labels": labels[row["id"]]} for row in rows]))
        return index

    @staticmethod
    def _plans(index: list[tuple[Path, list[dict]]], keep) -> list[ShardPlan]:
        plans = []
        for path, rows in index:
            chosen = [(i, row) for i, row in enumerate(rows) if keep(row)]
            if chosen:
                plans.append(ShardPlan(path=path, rows=[i for i, _ in chosen], trace_ids=[rows[i]["id"] for i, _ in chosen],
                                       labels=[rows[i]["labels"] for i, _ in chosen]))
        return plans

    # -- setup ----------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        config = self.config
        train_set, train_labels, self.label_params = self._open(self.train_folder)
        self.identity = train_set.identity
        self.capture_stride = int(train_set.identity.get("capture", {}).get("stride", 1))
        self.recipe_hidden_size = int(train_set.identity["model"]["hidden_size"])
        self.sources = [{"path": str(self.train_folder), "role": "train",
                         "manifest_sha256": manifest_sha256(self.train_folder), "traces": len(train_set)}]
        train_index = self._index(train_set, train_labels)
        if self.val_folder is None:
            problems = [row["problem_id"] for _, rows in train_index for row in rows]
            held_out = split_problems(problems, config.detector.val_fraction, config.detector.seed)
            self.train_plans = self._plans(train_index, lambda row: row["problem_id"] not in held_out)
            self.val_plans = self._plans(train_index, lambda row: row["problem_id"] in held_out)
        else:
            val_set, val_labels, _ = self._open(self.val_folder)
            if val_set.identity["model"].get("hidden_size") != self.recipe_hidden_size:
                raise TraceSetError(f"{self.val_folder}: hidden size {val_set.identity['model'].get('hidden_size')} "
                                    f"differs from the training traces' {self.recipe_hidden_size}")
            if int(val_set.identity.get("capture", {}).get("stride", 1)) != self.capture_stride:
                raise TraceSetError(f"{self.val_folder}: capture stride {val_set.identity.get('capture', {}).get('stride')} "
                                    f"differs from the training traces' {self.capture_stride}")
            if val_set.identity.get("tokenizer_hash") != train_set.identity.get("tokenizer_hash"):
                raise TraceSetError(f"{self.val_folder}: collected with another tokenizer than {self.train_folder}")
            self.sources.append({"path": str(self.val_folder), "role": "val",
                                 "manifest_sha256": manifest_sha256(self.val_folder), "traces": len(val_set)})
            self.train_plans = self._plans(train_index, lambda row: True)
            self.val_plans = self._plans(self._index(val_set, val_labels), lambda row: True)
        self.recipe = FeatureRecipe(layers=tuple(config.probe.layers), hidden_size=self.recipe_hidden_size,
                                    mean_window=config.detector.mean_window, stride=self.capture_stride)
        self.stats, train_counts = self._fit_statistics(self.train_plans)
        self.counts = {"train": train_counts, "val": self._count(self.val_plans)}
        # A head whose targets are all one class in a split cannot be trained or judged there. It is left
        # untrained (its alarm disabled, said in the card) as long as the other head can learn; with no
        # learnable head at all, the trace set is refused.
        self.untrained_heads: dict[str, str] = {}
        for split, counts in self.counts.items():
            for head in HEADS:
                positives, positions = counts[f"{head}_positives"], counts[f"{head}_positions"]
                if (positives == 0 or positives == positions) and head not in self.untrained_heads:
                    kind = "no positive" if positives == 0 else "only positive"
                    source = self.val_folder if split == "val" and self.val_folder else self.train_folder
                    self.untrained_heads[head] = (f"{source}: the {split} split has {kind} labels for {head} "
                                                  f"({positions} positions of {counts['traces']} traces); "
                                                  f"collect more traces or relabel")
        if len(self.untrained_heads) == len(HEADS):
            raise TraceSetError(next(iter(self.untrained_heads.values())))
        self.pos_weight = [(train_counts[f"{h}_positions"] - train_counts[f"{h}_positives"]) / train_counts[f"{h}_positives"]
                           if h not in self.untrained_heads else 1.0 for h in HEADS]
        self._ready = True

    def _fit_statistics(self, plans: list[ShardPlan]) -> tuple[NormalisationStats, dict[str, int]]:
        accumulator = StatsAccumulator(len(self.config.probe.layers), self.recipe_hidden_size)
        for plan in plans:
            shard = read_shard(plan.path)
            offsets = shard["capture_offsets"]
            for row in plan.rows:
                accumulator.add(shard["hidden"][int(offsets[row]) : int(offsets[row + 1])])
        if accumulator.count == 0:
            raise TraceSetError(f"{self.train_folder}: the training split has no captured positions")
        return accumulator.stats(), self._count(plans)

    def _count(self, plans: list[ShardPlan]) -> dict[str, int]:
        counts = {"traces": 0, "positions": 0, **{f"{h}_{k}": 0 for h in HEADS for k in ("positives", "positions")}}
        for plan in plans:
            shard = read_shard(plan.path, with_hidden=False)
            offsets = shard["capture_offsets"]
            for row, trace_labels in zip(plan.rows, plan.labels):
                positions = shard["positions"][int(offsets[row]) : int(offsets[row + 1])]
                targets = _targets(trace_labels, positions, self.config.labels.horizon)
                counts["traces"] += 1
                counts["positions"] += positions.numel()
                for index, head in enumerate(HEADS):
                    defined = ~targets[:, index].isnan()
                    counts[f"{head}_positives"] += int(targets[defined, index].sum())
                    counts[f"{head}_positions"] += int(defined.sum())
        return counts

    # -- loaders --------------------------------------------------------------------------------

    @property
    def feature_device(self) -> torch.device:
        """Where the loaders build features: the GPU the probe trains on (`accelerator="auto"`), or the CPU."""
        if self.config.detector.feature_device == "auto" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _stream(self, plans: list[ShardPlan], shuffle: bool, device: str | torch.device = "cpu") -> _PositionStream:
        return _PositionStream(plans, self.recipe, self.stats, self.config.labels.horizon,
                               self.config.detector.batch_size, shuffle, device)

    def _loader(self, plans: list[ShardPlan], shuffle: bool) -> DataLoader:
        device = self.feature_device
        if device.type != "cpu":  # features built on the GPU, in runs that fit there; no worker processes
            plans = _split_plans_by_bytes(plans, self.recipe.feature_dim, GPU_PLAN_BYTES)
            return DataLoader(self._stream(plans, shuffle, device), batch_size=None, num_workers=0)
        workers = self.config.detector.num_workers
        if plans and workers > len(plans):  # fewer shards than workers (a large model's few big shards): split them
            plans = _split_plans(plans, -(-workers // len(plans)))
        workers = min(workers, len(plans))
        return DataLoader(self._stream(plans, shuffle), batch_size=None, num_workers=workers,
                          persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_plans, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_plans, shuffle=False)

    def traces(self, split: str = "val") -> Iterator[TraceExample]:
        """Every trace of a split with its features and targets, in shard order, one shard in memory."""
        plans = {"train": self.train_plans, "val": self.val_plans}[split]
        for plan in plans:
            yield from _plan_traces(plan, self.recipe, self.stats, self.config.labels.horizon)

    def problem_ids(self, split: str) -> set[str]:
        problems = set()
        for plan in {"train": self.train_plans, "val": self.val_plans}[split]:
            rows = read_shard(plan.path, with_hidden=False)["rows"]
            problems.update(rows[row]["problem_id"] for row in plan.rows)
        return problems
