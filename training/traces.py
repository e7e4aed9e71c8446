"""The trace set: what a collection run writes, readable without the code that wrote it.

A trace set is a folder with `manifest.json` and shards (`shard-00000.safetensors`, ...). The manifest
records what produced the traces (model ids, tokenizer hash, config, seeds, layers, capture policy,
schema version) and every finished shard with its row count and SHA-256. A shard is a safetensors
file whose tensors hold the token ids and captured hidden states of its traces, concatenated with
offsets, and whose metadata holds the per-trace fields as JSON:

  prompt_ids, generated_ids          int32, concatenated; prompt_offsets, generated_offsets int64 [n+1]
  top_prob                           float32, one per generated token (same offsets as generated_ids):
                                     the model's softmax probability of its most likely next token at
                                     the forward pass that produced that token (raw logits, before
                                     temperature and truncation); the confidence rule reads it
  positions                          int32, generated positions whose hidden states were kept
  hidden                             float16/bfloat16 [captured, layers, hidden_size]
  capture_offsets                    int64 [n+1], slices of positions/hidden per trace
  metadata["traces"]                 JSON list: id, problem_id, sample, finish_reason, answer, gold,
                                     correct, wall_seconds, text

Position t of a trace is its t-th generated token; its hidden state is the one of the forward pass
that produced token t (the state the model was in when it chose it). Shards are written atomically
(temporary file, then rename) and listed in the manifest only once complete, so a killed run loses
at most the shard in progress.

Schema versions: 2 added `top_prob`. Version 1 trace sets are still read (their traces have
`top_prob = None`; what needs it says so) but not resumed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inference.errors import RescueError
from inference.storage import file_sha256, replace_atomically

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LABELS = "labels.json"


class TraceSetError(RescueError):
    """A trace set is missing, corrupt, truncated or does not match what the command expects."""


@dataclass
class Trace:
    """One generated trace with its captured hidden states (`hidden[i]` belongs to `positions[i]`)."""

    id: str
    problem_id: str
    sample: int
    prompt_ids: list[int]
    generated_ids: list[int]
    finish_reason: str
    answer: str | None
    gold: str
    correct: bool
    wall_seconds: float
    text: str
    positions: torch.Tensor
    hidden: torch.Tensor
    top_prob: torch.Tensor | None = None
    """[len(generated_ids)] float32: the model's top-token probability at each generated position;
    None in schema-1 trace sets, which did not store it."""

    def fields(self) -> dict[str, Any]:
        """The JSON-able per-trace fields stored in shard metadata."""
        return {k: getattr(self, k) for k in
                ("id", "problem_id", "sample", "finish_reason", "answer", "gold", "correct", "wall_seconds", "text")}


@dataclass
class ShardEntry:
    file: str
    index: int
    rows: int
    sha256: str
    generated_tokens: int
    captured_positions: int
    bytes: int


@dataclass
class Manifest:
    """What produced a trace set and which shards are complete."""

    identity: dict[str, Any]
    shards: list[ShardEntry] = field(default_factory=list)
    planned_shards: int = 0
    complete: bool = False
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps({"schema_version": self.schema_version, "complete": self.complete,
                           "planned_shards": self.planned_shards, **self.identity,
                           "shards": [asdict(s) for s in sorted(self.shards, key=lambda s: s.index)]}, indent=2)

    @classmethod
    def from_file(cls, path: Path) -> "Manifest":
        try:
            raw = json.loads(path.read_text())
            shards = [ShardEntry(**s) for s in raw.pop("shards")]
            version = raw.pop("schema_version")
            complete = raw.pop("complete")
            planned = raw.pop("planned_shards")
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise TraceSetError(f"{path}: not a readable trace-set manifest ({type(error).__name__})") from None
        if version not in READABLE_SCHEMA_VERSIONS:
            raise TraceSetError(f"{path}: schema version {version}, this code reads "
                                + " and ".join(map(str, READABLE_SCHEMA_VERSIONS)))
        return cls(identity=raw, shards=shards, planned_shards=planned, complete=complete, schema_version=version)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_shard(folder: Path, index: int, traces: list[Trace], hidden_dtype: torch.dtype) -> ShardEntry:
    """Write one shard atomically and return its manifest entry."""

    def concat(lists):
        flat = [x for ids in lists for x in ids]
        offsets = [0]
        for ids in lists:
            offsets.append(offsets[-1] + len(ids))
        return torch.tensor(flat, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int64)

    prompt_ids, prompt_offsets = concat([t.prompt_ids for t in traces])
    generated_ids, generated_offsets = concat([t.generated_ids for t in traces])
    for t in traces:
        if t.top_prob is None or t.top_prob.numel() != len(t.generated_ids):
            got = "none" if t.top_prob is None else t.top_prob.numel()
            raise ValueError(f"trace {t.id}: top_prob must hold one value per generated token "
                             f"({len(t.generated_ids)}), got {got}")
    top_prob = torch.cat([t.top_prob.reshape(-1).float() for t in traces])
    positions, capture_offsets = concat([t.positions.tolist() for t in traces])
    hidden = torch.cat([t.hidden.to(hidden_dtype) for t in traces], dim=0).contiguous()
    tensors = {
        "prompt_ids": prompt_ids, "prompt_offsets": prompt_offsets,
        "generated_ids": generated_ids, "generated_offsets": generated_offsets, "top_prob": top_prob,
        "positions": positions, "capture_offsets": capture_offsets, "hidden": hidden,
    }
    metadata = {"schema_version": str(SCHEMA_VERSION), "traces": json.dumps([t.fields() for t in traces])}
    path = folder / shard_name(index)
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    replace_atomically(temporary, path)
    return ShardEntry(file=path.name, index=index, rows=len(traces), sha256=file_sha256(path),
                      generated_tokens=int(generated_offsets[-1]), captured_positions=int(positions.numel()),
                      bytes=path.stat().st_size)


class TraceSet:
    """Reading a trace set: manifest, checksum-verified shards, traces one at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise TraceSetError(f"{self.folder}: not a trace set (no {MANIFEST}); make one with `rescue collect`")
        self.manifest = Manifest.from_file(manifest_path)

    @property
    def identity(self) -> dict[str, Any]:
        return self.manifest.identity

    @property
    def stores_top_prob(self) -> bool:
        """Whether the traces carry `top_prob` (schema version 2 on)."""
        return self.manifest.schema_version >= 2

    def verify(self, entry: ShardEntry) -> Path:
        path = self.folder / entry.file
        if not path.is_file():
            raise TraceSetError(f"{path}: shard listed in the manifest is missing")
        if file_sha256(path) != entry.sha256:
            raise TraceSetError(f"{path}: shard is corrupt or truncated (checksum does not match the manifest)")
        return path

    def shard_traces(self, entry: ShardEntry, with_hidden: bool = True) -> Iterator[Trace]:
        """The traces of one verified shard; `with_hidden=False` skips reading the hidden states."""
        path = self.verify(entry)
        with safe_open(str(path), framework="pt") as handle:
            rows = json.loads(handle.metadata()["traces"])
            t = {name: handle.get_tensor(name) for name in handle.keys() if with_hidden or name != "hidden"}
        if not with_hidden:
            t["hidden"] = torch.zeros((int(t["capture_offsets"][-1]), 0))
        for i, row in enumerate(rows):
            p0, p1 = t["prompt_offsets"][i].item(), t["prompt_offsets"][i + 1].item()
            g0, g1 = t["generated_offsets"][i].item(), t["generated_offsets"][i + 1].item()
            c0, c1 = t["capture_offsets"][i].item(), t["capture_offsets"][i + 1].item()
            yield Trace(prompt_ids=t["prompt_ids"][p0:p1].tolist(), generated_ids=t["generated_ids"][g0:g1].tolist(),
                        positions=t["positions"][c0:c1].long(), hidden=t["hidden"][c0:c1],
                        top_prob=t["top_prob"][g0:g1] if "top_prob" in t else None, **row)

    def traces(self, with_hidden: bool = True) -> Iterator[Trace]:
        for entry in sorted(self.manifest.shards, key=lambda s: s.index):
            yield from self.shard_traces(entry, with_hidden)

    def __iter__(self) -> Iterator[Trace]:
        return self.traces()

    def __len__(self) -> int:
        return sum(s.rows for s in self.manifest.shards)
