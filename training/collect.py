"""Trace collection: run a model through the step hook and keep what it generated and "thought".

The work is a fixed list of units (problem, sample) cut into shards of `capture.shard_size` units.
Each shard is generated with its own random generator (seeded by the run seed and the shard index),
so a shard's content does not depend on which process made it or whether the run was interrupted:
a resumed run, or several `torchrun` ranks each taking every N-th shard, produce exactly the trace
set of one uninterrupted run.

Hidden states of the configured layers are captured at every `capture.stride`-th generated
position plus a dense window of `capture.window` positions around each label event (loop onset,
first candidate answer, `</think>`, the last token) and at the token closing every arithmetic step
(`step_wrong`'s positions); the manifest records the policy. The model's
top-token probability is kept at every generated position (4 bytes a token), for the confidence rule.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from inference.config import RescueConfig
from inference.decoding.generate import Sampler, StepView, eos_token_ids, generate, resolve_layers
from inference.decoding.memory import BatchPlan, available_bytes, check_context, plan_batch
from inference.evaluation.answers import extract_final_answer
from inference.evaluation.grading import is_correct
from inference.prompts import Problem, render_prompt
from inference.storage import file_sha256, write_atomically
from training.labels import TraceLabels, label_trace, token_char_ends
from training.traces import (
    MANIFEST,
    SCHEMA_VERSION,
    Manifest,
    ShardEntry,
    Trace,
    TraceSetError,
    write_shard,
)

CAPTURE_EVENTS = ("loop_onset", "first_candidate_pos", "think_close", "last_token")


@dataclass(frozen=True)
class Unit:
    """One trace to generate: a problem and the index of the sample drawn for it."""

    problem: Problem
    sample: int

    @property
    def trace_id(self) -> str:
        return f"{self.problem.id}#{self.sample}"


def plan_units(problems: Sequence[Problem], samples: int) -> list[Unit]:
    return [Unit(problem, sample) for problem in problems for sample in range(samples)]


def shard_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def tokenizer_hash(tokenizer) -> str:
    """A digest of the vocabulary and special tokens: traces are only comparable under one tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr((vocab, tokenizer.all_special_tokens)).encode()).hexdigest()[:16]


def capture_positions(length: int, labels: TraceLabels, think_close: int | None, stride: int, window: int) -> list[int]:
    """Generated positions whose hidden states are kept: a stride, dense windows around events, and the
    tokens closing arithmetic steps."""
    keep = set(range(0, length, stride))
    events = [labels.loop_onset, labels.first_candidate_pos, think_close, length - 1]
    for event in events:
        if event is not None:
            keep.update(range(max(0, event - window), min(length, event + window + 1)))
    # The token closing every arithmetic step: where the `step_wrong` head is trained and scored.
    keep.update(token for token, _, _ in labels.steps if token < length)
    return sorted(keep)


class HiddenRecorder:
    """A step hook that keeps every row's hidden states of the chosen layers in one buffer
    ([batch, budget, layers, hidden] in `dtype`) and its top-token probability at every step in another
    ([batch, budget] float32).

    It takes both from the step's outputs for the whole batch, made inside the step (in the CUDA graph
    on the static path): decode with `generate(..., layers=layers, top_prob=True, stack_dtype=dtype)`.
    One copy each per step; a row's positions at or past its length hold what the padding fed to it
    after it finished produced, so readers take the first `length` positions.
    """

    def __init__(self, layers: Sequence[int], batch: int, budget: int, dtype: torch.dtype):
        self.layers = list(layers)
        self.batch, self.budget, self.dtype = batch, budget, dtype
        self.buffer: torch.Tensor | None = None
        self.top_prob: torch.Tensor | None = None

    def __call__(self, view: StepView) -> None:
        states, top_prob = view.outputs.stacked, view.outputs.top_prob
        if self.buffer is None:  # the step outputs keep their form for the whole generation: check once
            asked = states is not None and states.dtype == self.dtype and states.shape[1] == len(self.layers)
            if not asked or top_prob is None:
                raise ValueError(f"HiddenRecorder needs generate(..., layers={self.layers}, top_prob=True, "
                                 f"stack_dtype={self.dtype})")
            self.buffer = torch.zeros((self.batch, self.budget, *states.shape[1:]), dtype=self.dtype,
                                      device=states.device)
            self.top_prob = torch.zeros((self.batch, self.budget), dtype=torch.float32, device=states.device)
        self.buffer[:, view.step] = states
        self.top_prob[:, view.step] = top_prob


def collection_identity(config: RescueConfig, model_ids: dict[str, Any], tokenizer, hidden_size: int,
                        split: str, samples: int, limit: int | None, precision: str) -> dict[str, Any]:
    """Everything that determines a trace set's content; a resume must match it field by field."""
    return {
        "kind": "lowbit-rescue trace set",
        "model": {**model_ids, "precision": precision, "hidden_size": hidden_size},
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "collection": {"benchmark": config.benchmark.name, "benchmark_path": config.benchmark.path,
                       "split": split, "samples": samples, "limit": limit, "seed": config.sampling.seed},
        # How rows are batched and which decode path runs them do not change the tokens.
        "sampling": {k: v for k, v in config.to_dict()["sampling"].items() if k not in ("batch_size", "decode")},
        "layers": list(config.probe.layers),
        "capture": {**config.to_dict()["capture"], "events": list(CAPTURE_EVENTS)},
        "labels": config.to_dict()["labels"],
        "config": config.to_dict(),
    }


def differing_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        fields = []
        for key in sorted(set(old) | set(new)):
            fields += differing_fields(old.get(key), new.get(key), f"{prefix}{key}.")
        return fields
    return [] if old == new else [f"{prefix.rstrip('.')} ({old!r} -> {new!r})"]


class TraceSetWriter:
    """Owns a trace set folder during collection: resume checks, per-rank manifests, merging."""

    def __init__(self, folder: Path, identity: dict[str, Any], planned_shards: int, rank: int, world: int):
        self.folder, self.identity, self.rank, self.world = folder, identity, rank, world
        self.planned = planned_shards
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        self.done: dict[int, ShardEntry] = {}
        for path in [folder / MANIFEST, *sorted(folder.glob("manifest.rank*.json"))]:
            if not path.is_file():
                continue
            previous = Manifest.from_file(path)
            if previous.schema_version != SCHEMA_VERSION:
                raise TraceSetError(f"{folder}: refusing to resume a trace set of schema version "
                                    f"{previous.schema_version} (this code writes {SCHEMA_VERSION}); "
                                    "collect into a new folder")
            # The config section repeats the specific fields above; run-only settings (output paths,
            # W&B) may differ between a run and its resume.
            diff = [f for f in differing_fields(self._comparable(previous.identity), self._comparable(identity))]
            if diff:
                raise TraceSetError(f"{folder}: refusing to resume a trace set collected with other settings: "
                                    + "; ".join(diff[:6]) + (" ..." if len(diff) > 6 else ""))
            for entry in previous.shards:
                shard = folder / entry.file
                if shard.is_file() and file_sha256(shard) == entry.sha256:
                    self.done[entry.index] = entry

    @staticmethod
    def _comparable(identity: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in identity.items() if k != "config"}

    @property
    def manifest_path(self) -> Path:
        return self.folder / (MANIFEST if self.world == 1 else f"manifest.rank{self.rank}.json")

    def add(self, entry: ShardEntry) -> None:
        self.done[entry.index] = entry
        self._write(self.manifest_path, [e for e in self.done.values() if self._mine(e.index)], complete=False)

    def _mine(self, index: int) -> bool:
        return self.world == 1 or index % self.world == self.rank

    def _write(self, path: Path, entries: list[ShardEntry], complete: bool) -> None:
        manifest = Manifest(identity=self.identity, shards=entries, planned_shards=self.planned, complete=complete)
        write_atomically(path, manifest.to_json().encode())

    def finish(self) -> Manifest:
        """Merge every rank's shards into manifest.json (rank 0, after all ranks are done)."""
        entries = dict(self.done)
        for path in sorted(self.folder.glob("manifest.rank*.json")):
            for entry in Manifest.from_file(path).shards:
                entries[entry.index] = entry
        complete = len(entries) == self.planned
        self._write(self.folder / MANIFEST, list(entries.values()), complete=complete)
        for path in self.folder.glob("manifest.rank*.json"):
            path.unlink()
        return Manifest.from_file(self.folder / MANIFEST)


def prompt_lengths(tokenizer, units: Sequence[Unit]) -> list[int]:
    """Tokens of each unit's rendered prompt."""
    prompts = [render_prompt(tokenizer, u.problem.question) for u in units]
    return [len(ids) for ids in tokenizer(prompts).input_ids]


def shard_batch_plan(model, tokenizer, units: Sequence[Unit], config: RescueConfig) -> BatchPlan:
    """The batch a shard is generated in: sampling.batch_size rows, fewer where the GPU's free memory
    cannot hold that many static caches of the longest prompt + budget (inference/decoding/memory.py)."""
    device = next(model.parameters()).device
    return plan_batch(model.config, len(units), config.sampling.batch_size, max(prompt_lengths(tokenizer, units)),
                      config.sampling.budget, _compute_dtype(model), available_bytes(device),
                      len(config.probe.layers), getattr(torch, config.capture.dtype))


def _compute_dtype(model) -> torch.dtype:
    """The dtype activations and the KV cache are held in (the embedding's: packed 2-bit linears hold ints)."""
    return model.get_input_embeddings().weight.dtype


def generate_shard(model, tokenizer, units: Sequence[Unit], config: RescueConfig, seed: int,
                   plan: BatchPlan | None = None) -> list[tuple[Trace, TraceLabels]]:
    """Generate one shard's traces (in batches of `plan.batch`, default `shard_batch_plan`) with
    captured hidden states and their labels."""
    device = next(model.parameters()).device
    sampling = config.sampling
    sampler = Sampler(sampling.temperature, sampling.top_k, sampling.top_p)
    generator = torch.Generator(device=device).manual_seed(seed)
    layers = list(config.probe.layers)
    resolve_layers(layers, model.config.num_hidden_layers)
    dtype = getattr(torch, config.capture.dtype)
    think_close_id = tokenizer.convert_tokens_to_ids("</think>")
    stop_ids = eos_token_ids(tokenizer, model)
    batch_size = (plan or shard_batch_plan(model, tokenizer, units, config)).batch
    results = []
    for start in range(0, len(units), batch_size):
        batch = units[start : start + batch_size]
        prompts = [render_prompt(tokenizer, u.problem.question) for u in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
        recorder = HiddenRecorder(layers, len(batch), sampling.budget, dtype)
        began = time.perf_counter()
        out = generate(model, encoded.input_ids, encoded.attention_mask, max_new_tokens=sampling.budget,
                       eos_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id, sampler=sampler, decode=sampling.decode,
                       generator=generator, layers=layers, hook=recorder, top_prob=True, stack_dtype=dtype)
        share = (time.perf_counter() - began) / len(batch)
        for row, unit in enumerate(batch):
            ids = out.generated_ids[row]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            labels = label_trace(ids, text, token_char_ends(tokenizer, ids), out.finish_reasons[row],
                                 unit.problem.answer, config.labels)
            think_close = ids.index(think_close_id) if think_close_id in ids else None
            keep = capture_positions(len(ids), labels, think_close, config.capture.stride, config.capture.window)
            prompt = encoded.input_ids[row][encoded.attention_mask[row].bool()].tolist()
            answer = extract_final_answer(text)
            trace = Trace(
                id=unit.trace_id, problem_id=unit.problem.id, sample=unit.sample, prompt_ids=prompt,
                generated_ids=ids, finish_reason=out.finish_reasons[row], answer=answer,
                gold=unit.problem.answer, correct=is_correct(answer, unit.problem.answer),
                wall_seconds=round(share, 4), text=text, positions=torch.tensor(keep, dtype=torch.long),
                hidden=recorder.buffer[row, keep].cpu() if keep else torch.zeros(0),
                top_prob=recorder.top_prob[row, : len(ids)].cpu(),
            )
            results.append((trace, labels))
    return results


def collect_traces(
    model,
    tokenizer,
    problems: Sequence[Problem],
    config: RescueConfig,
    *,
    out_dir: str | Path,
    identity: dict[str, Any],
    samples: int,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """Collect (or resume) a trace set; returns counts, loop rate and storage per token."""
    units = plan_units(problems, samples)
    # Refused before any generation and before the folder is made: a budget past the model's context.
    check_context(model.config, max(prompt_lengths(tokenizer, units), default=0), config.sampling.budget,
                  getattr(model.config, "_name_or_path", None) or "the model")
    size = config.capture.shard_size
    shards = [units[i : i + size] for i in range(0, len(units), size)]
    writer = TraceSetWriter(Path(out_dir), identity, len(shards), rank, world)
    todo = [i for i in range(len(shards)) if i % world == rank and i not in writer.done]
    mine = sum(len(shards[i]) for i in range(len(shards)) if i % world == rank)
    bar = tqdm(total=mine, initial=mine - sum(len(shards[i]) for i in todo), desc=f"collect (rank {rank})"
               if world > 1 else "collect", unit="trace", disable=not progress, dynamic_ncols=True)
    tokens = loops = traces = 0
    for index in todo:
        plan = shard_batch_plan(model, tokenizer, shards[index], config)
        bar.set_postfix(batch=plan.describe(), refresh=True)
        results = generate_shard(model, tokenizer, shards[index], config, shard_seed(config.sampling.seed, index),
                                 plan=plan)
        writer.add(write_shard(Path(out_dir), index, [t for t, _ in results], getattr(torch, config.capture.dtype)))
        tokens += sum(len(t.generated_ids) for t, _ in results)
        loops += sum(labels.loop_onset is not None for _, labels in results)
        traces += len(results)
        bar.update(len(results))
        elapsed = bar.format_dict["elapsed"] or 1e-9
        bar.set_postfix(batch=plan.describe(), tok_s=f"{tokens / elapsed:.0f}", loop_rate=f"{loops / traces:.1%}")
    bar.close()
    return {"rank": rank, "new_traces": traces, "new_tokens": tokens, "resumed_shards": len(writer.done) - len(todo),
            "writer": writer}


def distributed_context() -> tuple[int, int]:
    """(rank, world size) under torchrun, initialising a process group for the final barrier."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world
