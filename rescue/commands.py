"""One function per `rescue` subcommand. Each takes the validated config plus its own options.

These functions are the only place that wires stages together (benchmarks from `training`,
models and runners from `inference`); the stage packages never import each other upward.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from inference.config import RescueConfig
from inference.errors import RescueError

METHODS = ("fp16", "2bit")


def quantize(config: RescueConfig, out: str | None = None) -> dict:
    """Make the 2-bit GPTQ twin of `model.fp16`, calibrated on `quantization.calibration` problems."""
    from inference.models import load_tokenizer, resolve_model_source
    from inference.prompts import render_prompt
    from inference.quantize import quantize_model
    from training.benchmarks import calibration_problems

    calibration = config.quantization.calibration
    source = resolve_model_source(config.model.fp16, "model")
    problems = calibration_problems(calibration.benchmark, calibration.split, calibration.path, calibration.size)
    tokenizer = load_tokenizer(source)
    texts = [render_prompt(tokenizer, p.question) + (p.solution or "") for p in problems]
    out_dir = out or config.quantized_path
    print(f"quantizing {config.model.fp16} to {config.quantization.bits} bits "
          f"(group size {config.quantization.group_size}) on {len(texts)} calibration problems")
    summary = quantize_model(str(source), out_dir, texts, config.quantization, device=config.model.device)
    print(f"wrote {summary['out']} in {summary['seconds']:.1f} s")
    return summary


def evaluate(
    config: RescueConfig,
    method: str = "2bit",
    limit: int | None = None,
    out: str | None = None,
) -> dict:
    """Run one method on the configured benchmark split and write its evaluation record."""
    from inference.evaluate import run_method, summarize, write_evaluation
    from inference.models import load_full_precision, load_quantized
    from inference.tracking import start_run
    from training.benchmarks import load_benchmark

    if method not in METHODS:
        raise RescueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if limit is not None and limit < 1:
        raise RescueError(f"--limit must be a positive integer, got {limit}")
    bench = config.benchmark
    problems = load_benchmark(bench.name, bench.split, bench.path, limit=limit)
    if method == "fp16":
        model, tokenizer = load_full_precision(config.model.fp16, config.model.dtype, config.model.device)
    else:
        model, tokenizer = load_quantized(config.quantized_path, config.model.device, config.model.kernel,
                                          config.model.dtype)
    out_dir = Path(out or Path(config.output_dir) / config.model.name / f"evaluate-{method}-{bench.name}-{bench.split}")

    run = start_run(config.wandb.mode, config.wandb.project, f"{config.model.name}-{method}-{bench.name}",
                    "evaluate", {**config.to_dict(), "method": method, "limit": limit}, out_dir.parent)
    began = time.perf_counter()
    records = run_method(model, tokenizer, problems, method=method, sampling=config.sampling)
    summary = summarize(records)
    summary.update(model=config.model.name, benchmark=bench.name, split=bench.split,
                   total_wall_seconds=round(time.perf_counter() - began, 2))
    write_evaluation(out_dir, records, summary)
    if run is not None:
        log_evaluation(run, records, summary)
        run.finish()
    print(format_summary(summary))
    print(f"evaluation record: {out_dir}")
    return summary


def log_evaluation(run, records, summary) -> None:
    import wandb

    table = wandb.Table(columns=["problem_id", "generated_tokens", "finish_reason", "answer", "gold", "correct"])
    for r in records:
        table.add_data(r.problem_id, r.generated_tokens, r.finish_reason, r.answer, r.gold, r.correct)
    run.log({"records": table})
    run.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict)})
    for reason, count in summary["finish_reasons"].items():
        run.summary[f"finish/{reason}"] = count


def format_summary(summary: dict) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["finish_reasons"].items()))
    return (
        f"{summary['method']} on {summary['benchmark']}/{summary['split']} ({summary['problems']} problems): "
        f"accuracy {summary['accuracy']:.1%}, generated tokens mean {summary['mean_generated_tokens']:.1f} "
        f"median {summary['median_generated_tokens']:.0f} p90 {summary['p90_generated_tokens']:.0f}, "
        f"finish: {reasons}, unclosed think {summary['unclosed_think']} ({summary['unclosed_share']:.1%}), "
        f"hit budget {summary['budget_share']:.1%}, loop {summary['loop_share']:.1%}, "
        f"loop or no commit {summary['loop_or_no_commit_share']:.1%}, wall {summary['total_wall_seconds']:.1f} s"
    )


def pretrain(config: RescueConfig, out: str | None = None) -> dict:
    """Train an embedded family model (architecture and recipe in the config's `pretrain` section)."""
    import json

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from inference.storage import folder_written_atomically
    from training.pretrain import ArithTraceData, ReasonerLM, count_parameters, family_config
    from training.tokenizer import build_tokenizer

    spec = config.pretrain
    out_dir = Path(out or config.model.fp16)
    run_dir = Path(config.output_dir) / config.model.name / "pretrain"
    tokenizer = build_tokenizer()
    L.seed_everything(spec.seed, verbose=False)
    data = ArithTraceData(tokenizer, spec)
    data.setup()
    steps = (len(data.train_set) // spec.batch_size) * spec.epochs
    module = ReasonerLM(family_config(spec, tokenizer), spec, steps)
    parameters = count_parameters(module.model)
    print(f"pretraining {config.model.name}: {parameters / 1e6:.2f}M parameters, {len(data.train_set)} traces, "
          f"{spec.epochs} epochs, {steps} steps")
    logger = _lightning_logger(config, run_dir, "pretrain")
    gpu = torch.cuda.is_available()
    trainer = L.Trainer(
        max_epochs=spec.epochs,
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
        gradient_clip_val=1.0,
        logger=logger,
        log_every_n_steps=20,
        callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_epochs=1, save_top_k=-1),
                   TQDMProgressBar(refresh_rate=20)],
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    began = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - began
    model = module.model.to(torch.float16).cpu()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    record = {
        "model": config.model.name,
        "parameters": parameters,
        "train_traces": len(data.train_set),
        "epochs": spec.epochs,
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "val_loss": float(trainer.callback_metrics.get("val/loss", float("nan"))),
    }
    with folder_written_atomically(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out_dir}: val loss {record['val_loss']:.4f}, {seconds:.0f} s on {record['device']}")
    return record


def _lightning_logger(config: RescueConfig, run_dir: Path, job: str):
    """W&B through Lightning's WandbLogger (offline by default); False when W&B is disabled."""
    if config.wandb.mode == "disabled":
        return False
    from lightning.pytorch.loggers import WandbLogger

    from inference.tracking import start_run

    run = start_run(config.wandb.mode, config.wandb.project, f"{config.model.name}-{job}", job,
                    config.to_dict(), run_dir)
    return WandbLogger(experiment=run)


def _load_for_precision(config: RescueConfig, precision: str):
    from inference.models import load_full_precision, load_quantized

    if precision == "fp16":
        return load_full_precision(config.model.fp16, config.model.dtype, config.model.device)
    return load_quantized(config.quantized_path, config.model.device, config.model.kernel, config.model.dtype)


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

    if precision not in METHODS:
        raise RescueError(f"--precision must be one of {', '.join(METHODS)}, got {precision!r}")
    if limit is not None and limit < 1:
        raise RescueError(f"--limit must be a positive integer, got {limit}")
    samples = config.capture.samples if samples is None else samples
    if samples < 1:
        raise RescueError(f"--samples must be a positive integer, got {samples}")
    problems = load_benchmark(config.benchmark.name, split, config.benchmark.path, limit=limit)
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
    return summary


def label(config: RescueConfig, traces: str, report: str | None = None) -> dict:
    """Label every trace of a trace set (from token ids and text alone) and write the label report.

    Labels go to `<traces>/labels.json` together with the parameters used, so relabeling with other
    parameters rewrites that file and never needs a new collection.
    """
    import json
    from dataclasses import asdict

    from inference.models import load_tokenizer, resolve_model_source
    from inference.tracking import start_run
    from training.collect import tokenizer_hash
    from training.labels import label_report, label_trace, token_char_ends
    from inference.storage import write_atomically
    from training.traces import LABELS, TraceSet, TraceSetError

    trace_set = TraceSet(traces)
    identity = trace_set.identity
    tokenizer = load_tokenizer(resolve_model_source(identity["model"]["fp16"], "model"))
    if tokenizer_hash(tokenizer) != identity["tokenizer_hash"]:
        raise TraceSetError(f"{traces}: collected with another tokenizer than {identity['model']['fp16']}'s")
    labels = {}
    for trace in trace_set.traces(with_hidden=False):
        labels[trace.id] = label_trace(trace.generated_ids, trace.text, token_char_ends(tokenizer, trace.generated_ids),
                                       trace.finish_reason, trace.gold, config.labels)
    if not labels:
        raise TraceSetError(f"{traces}: the trace set holds no traces")
    record = {"params": asdict(config.labels), "traces": {k: v.to_dict() for k, v in labels.items()}}
    write_atomically(Path(traces) / LABELS, json.dumps(record).encode())
    report_dir = Path(report or Path(traces) / "label-report")
    summary = label_report(list(labels.values()), report_dir)
    run = start_run(config.wandb.mode, config.wandb.project, f"{identity['model']['name']}-label", "label",
                    {"labels": asdict(config.labels), "traces": str(traces)}, Path(traces).parent)
    if run is not None:
        import wandb

        run.summary.update({k: v for k, v in _flatten(summary).items() if isinstance(v, (int, float, str))})
        run.log({png.stem: wandb.Image(str(png)) for png in sorted(report_dir.glob("*.png"))})
        run.finish()
    print((report_dir / "label-report.md").read_text())
    print(f"labels: {Path(traces) / LABELS}; report: {report_dir}")
    return summary


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def train(config: RescueConfig, traces: str, val: str | None = None, out: str | None = None,
          test: str | None = None) -> dict:
    """Fit the probe on labeled trace sets, calibrate it and write the detector artifact.

    With `test`, the offline comparison with the rule (`detect-report`) follows on those traces.
    """
    from training.fit import detect_report as compare_offline
    from training.fit import train_detector

    summary = train_detector(config, traces, val=val, out=out)
    if test is not None:
        summary["detect_report"] = compare_offline(config, test, detector=summary["artifact"])
    return summary


def detect_report(config: RescueConfig, test: str, detector: str | None = None, out: str | None = None) -> dict:
    """Replay held-out traces with the learned trigger and the rule, at the same false-alarm rate."""
    from training.fit import detect_report as compare_offline

    return compare_offline(config, test, detector=detector, out=out)
