"""Benchmark: how fast the detector's DataModule turns a trace set into training batches (no model).

Writes a synthetic labeled trace set in one shard, as a large model's collection writes it (the 8B
rehearsal: 64 traces of 8,192 tokens, stride 8, three layers of 4,096 channels, one shard of 1.66 GB),
then times `TraceDataModule.setup` and whole epochs of its training and validation loaders: positions
per second of features and targets, on the CPU, before any probe runs. On the GPU the detector's fit
cannot train faster than this.

    python benchmarks/detector_data.py --hidden 4096 --layers 3 --traces 32 --length 4096 --out detector-data.json

Every second trace loops from its midpoint, every other one commits correctly, and each states one
answer at a third of its length (as the rehearsal's timing labels); hidden states are random.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_trace_set(folder: Path, traces: int, length: int, stride: int, layers: int, hidden: int) -> Path:
    from training.labels import TraceLabels
    from training.traces import LABELS, MANIFEST, Manifest, Trace, write_shard

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    written, records = [], {}
    for index in range(traces):
        positions = torch.arange(0, length, stride)
        states = torch.randn(len(positions), layers, hidden, generator=generator).half()
        loops = index % 2 == 0
        trace_id = f"p{index}#0"
        written.append(Trace(id=trace_id, problem_id=f"p{index}", sample=0, prompt_ids=[1, 2, 3],
                             generated_ids=[5] * length, finish_reason="budget" if loops else "eos",
                             answer=None if loops else "1", gold="1", correct=not loops, wall_seconds=0.0, text="",
                             positions=positions, hidden=states, top_prob=torch.full((length,), 0.9)))
        records[trace_id] = TraceLabels(
            length=length, loop_onset=length // 2 if loops else None, loop_period=16 if loops else None,
            budget_exhausted=loops, unclosed_think=loops, committed=not loops, first_candidate_pos=length // 3,
            delayed_commitment=False, correct=not loops, fails_to_commit=loops,
            candidates=((length // 3, not loops),)).to_dict()
    entry = write_shard(folder, 0, written, torch.float16)
    identity = {"kind": "lowbit-rescue trace set",
                "model": {"name": "synthetic", "fp16": "synthetic", "quantized": None, "precision": "2bit",
                          "hidden_size": hidden},
                "tokenizer_hash": "synthetic", "layers": list(range(layers)), "sampling": {"budget": length},
                "capture": {"stride": stride, "window": 0}}
    manifest = Manifest(identity=identity, shards=[entry], planned_shards=1, complete=True)
    (folder / MANIFEST).write_text(manifest.to_json())
    (folder / LABELS).write_text(json.dumps({"params": {"horizon": 64}, "traces": records}))
    return folder


def epoch_rate(loader) -> dict:
    began, positions = time.perf_counter(), 0
    for features, _ in loader:
        positions += features.shape[0]
    seconds = time.perf_counter() - began
    return {"positions": positions, "seconds": round(seconds, 3), "positions_per_s": round(positions / seconds, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--traces", type=int, default=32)
    parser.add_argument("--length", type=int, default=4096, help="generated tokens per trace")
    parser.add_argument("--stride", type=int, default=8, help="capture stride")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="detector.num_workers")
    parser.add_argument("--batch-size", type=int, default=512, help="detector.batch_size")
    parser.add_argument("--work", default=None, help="folder of the synthetic trace set (default: a temporary one)")
    parser.add_argument("--out", default=None, help="results JSON")
    args = parser.parse_args(argv)

    from inference.config import load_config
    from training.datamodule import TraceDataModule

    work = Path(args.work or tempfile.mkdtemp(prefix="detector-data-"))
    folder = work / f"set-{args.layers}x{args.hidden}-{args.traces}x{args.length}"
    if not (folder / "manifest.json").is_file():
        write_trace_set(folder, args.traces, args.length, args.stride, args.layers, args.hidden)
    config = load_config("tiny-s", {"model.name": "synthetic", "model.fp16": str(work / "no-such-model"),
                                    "probe.layers": list(range(args.layers)), "labels.horizon": 64,
                                    "wandb.mode": "disabled", "output_dir": str(work / "runs"),
                                    "detector.batch_size": args.batch_size, "detector.num_workers": args.workers,
                                    "detector.val_fraction": 0.25})
    module = TraceDataModule(config, folder)
    began = time.perf_counter()
    module.setup("fit")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {"machine": f"{platform.machine()} CPU ({os.cpu_count()} cores), torch threads {torch.get_num_threads()}",
              "commit": commit, "args": vars(args), "feature_dim": module.recipe.feature_dim,
              "setup_seconds": round(time.perf_counter() - began, 3),
              "train": [epoch_rate(module.train_dataloader()) for _ in range(args.epochs)],
              "val": [epoch_rate(module.val_dataloader()) for _ in range(args.epochs)]}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
