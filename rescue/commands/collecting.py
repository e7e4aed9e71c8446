"""`rescue collect`: a trace set (traces and hidden states of a split)."""

from __future__ import annotations

import os
from pathlib import Path

from inference.config import RescueConfig
from inference.errors import RescueError
from rescue.commands.common import PRECISIONS, _load_for_precision, warn_mismatches


def collect(
    config: RescueConfig,
    split: str = "train",
    samples: int | None = None,
    limit: int | None = None,
    out: str | None = None,
    precision: str = "2bit",
) -> dict:
    """Run the model over a benchmark split through the step hook and write (or resume) a trace set."""
    from training.benchmarks import load_benchmark
    from training.collect import collect_traces, collection_identity, distributed_context

    if precision not in PRECISIONS:
        raise RescueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if limit is not None and limit < 1:
        raise RescueError(f"--limit must be a positive integer, got {limit}")
    samples = config.capture.samples if samples is None else samples
    if samples < 1:
        raise RescueError(f"--samples must be a positive integer, got {samples}")
    problems = load_benchmark(config.benchmark.name, split, config.benchmark.path, limit=limit)
    warn_mismatches(config, two_bit=precision == "2bit")
    rank, world = distributed_context()
    if world > 1 and config.model.device == "auto":
        import torch

        if torch.cuda.is_available():
            config.model.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    model, tokenizer = _load_for_precision(config, precision)
    model_ids = {"name": config.model.name, "fp16": config.model.fp16,
                 "quantized": config.quantized_path if precision == "2bit" else None,
                 "kernel": config.model.kernel if precision == "2bit" else None}
    identity = collection_identity(config, model_ids, tokenizer, model.config.hidden_size, split, samples, limit,
                                   precision)
    bench = config.benchmark
    out_dir = Path(out or Path(config.output_dir) / config.model.name / f"traces-{precision}-{bench.name}-{split}")
    result = collect_traces(model, tokenizer, problems, config, out_dir=out_dir, identity=identity, samples=samples,
                            rank=rank, world=world)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank != 0:
        return result
    manifest = result["writer"].finish()
    generated = sum(s.generated_tokens for s in manifest.shards)
    captured = sum(s.captured_positions for s in manifest.shards)
    stored = sum(s.bytes for s in manifest.shards)
    summary = {"out": str(out_dir), "traces": sum(s.rows for s in manifest.shards), "shards": len(manifest.shards),
               "complete": manifest.complete, "generated_tokens": generated, "captured_positions": captured,
               "stored_bytes": stored, "bytes_per_generated_token": stored / max(generated, 1)}
    print(f"trace set {out_dir}: {summary['traces']} traces in {summary['shards']} shards, {generated} generated "
          f"tokens, {captured} captured positions; stored {stored / 1e6:.2f} MB = "
          f"{summary['bytes_per_generated_token']:.0f} bytes per generated token "
          f"(stride {config.capture.stride}, window {config.capture.window}, {config.capture.dtype})")
    _track_trace_set(config, out_dir, summary, split=split, precision=precision, samples=samples, limit=limit)
    return summary


def _track_trace_set(config: RescueConfig, out_dir: Path, summary: dict, **options) -> None:
    """W&B: a `collect` run whose output is the trace set artifact (versioned by its manifest)."""
    from inference.tracking import stage_config, start_run, trace_set_artifact

    run = start_run(config.wandb.mode, config.wandb.project, f"{config.model.name}-collect-{options['split']}",
                    "collect", stage_config(config, "collect", **options), out_dir.parent)
    if run is None:
        return
    run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run.log_artifact(trace_set_artifact(out_dir, config.model.name))
    run.finish()
