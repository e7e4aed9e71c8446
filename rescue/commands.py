"""One function per `rescue` subcommand. Each takes the validated config plus its own options.

These functions are the only place that wires stages together (benchmarks from `training`,
models and runners from `inference`); the stage packages never import each other upward.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from inference.config import RescueConfig
from inference.errors import ConfigError, RescueError

PRECISIONS = ("fp16", "2bit")


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
    with_solution = calibration.text == "solution"
    texts = [render_prompt(tokenizer, p.question) + ((p.solution or "") if with_solution else "") for p in problems]
    out_dir = out or config.quantized_path
    print(f"quantizing {config.model.fp16} to {config.quantization.bits} bits "
          f"(group size {config.quantization.group_size}) on {len(texts)} calibration problems "
          f"({'prompts and worked solutions' if with_solution else 'prompts only'})")
    summary = quantize_model(str(source), out_dir, texts, config.quantization, device=config.model.device)
    if summary["kept_fp16"]:
        print(f"kept {len(summary['kept_fp16'])} linears in full precision "
              f"(quantization.keep_fp16 {config.quantization.keep_fp16})")
    print(f"wrote {summary['out']} in {summary['seconds']:.1f} s")
    return summary


def evaluate(
    config: RescueConfig,
    method: str = "2bit",
    limit: int | None = None,
    out: str | None = None,
) -> dict:
    """Run one method on the configured benchmark split and write its evaluation record."""
    from inference.compare import METHODS as ALL_METHODS

    if method not in ALL_METHODS:
        raise RescueError(f"--method must be one of {', '.join(ALL_METHODS)}, got {method!r}")
    bench = config.benchmark
    out_dir = Path(out or Path(config.output_dir) / config.model.name / f"evaluate-{method}-{bench.name}-{bench.split}")
    return compare(config, limit=limit, methods=(method,), out=str(out_dir), single=True)


def task_mismatch(config: RescueConfig) -> str | None:
    """A warning when an embedded family model learned another generated task than the benchmark names.

    The task is in the model folder's `pretrain.json` (`recipe.task`; records from before the
    harder tasks have none and learned `arith`). Real models, and benchmarks that are not
    generated, are never warned about.
    """
    from training.benchmarks import GENERATED_BENCHMARKS

    benchmark = config.benchmark.name.strip().lower()
    if benchmark not in GENERATED_BENCHMARKS:
        return None
    try:
        from inference.models import resolve_model_source

        record = json.loads((resolve_model_source(config.model.fp16, "model") / "pretrain.json").read_text())
    except (RescueError, OSError, ValueError):
        return None
    learned = record.get("recipe", {}).get("task", "arith")
    if learned == benchmark:
        return None
    return (f"warning: {config.model.fp16} was trained on '{learned}' (its pretrain.json), "
            f"but the benchmark is '{benchmark}'; pass --benchmark {learned} to evaluate it on its own task")


def warn_mismatches(config: RescueConfig, two_bit: bool) -> None:
    """Print (stderr) the warnings about a model run on another task, or a 2-bit folder of another model."""
    for warning in (task_mismatch(config), twin_mismatch(config) if two_bit else None):
        if warning:
            print(warning, file=sys.stderr)


def _check_methods(config: RescueConfig, methods) -> None:
    """Refuse, before any model is loaded, a method whose settings cannot work."""
    control = config.rescue
    if control.plan_tokens < 1 and "plan-only" in methods:
        raise RescueError("rescue.plan_tokens: the plan budget must be a positive number of tokens for plan-only, "
                          "got 0")
    if control.plan_tokens < 1 and "rule" in methods and control.rule_plan:
        raise RescueError("rescue.plan_tokens: the plan budget must be a positive number of tokens when "
                          "rescue.rule_plan is true, got 0")
    if control.rule_window < control.rule_ngram:
        raise RescueError(f"rescue.rule_window ({control.rule_window}) must be at least rescue.rule_ngram "
                          f"({control.rule_ngram})")


def compare(config: RescueConfig, limit: int | None = None, methods=None, out: str | None = None,
            single: bool = False, progress: bool = True, costs_file: str | None = None,
            shape: str | None = None) -> dict:
    """Every method on the same problems with the same seeds: records, table, plots, W&B.

    Writes `<out>/<method>/records.jsonl|summary.json`, `comparison.md|json` and the plots (default
    `<output_dir>/<model>/compare-<benchmark>-<split>`). With `single` (rescue evaluate), one method
    is written straight into `out`. `costs_file` (a `benchmarks/decode.py` JSON) adds projected seconds
    at the Qwen3 `shape` (default: the config's model name) on the machine that measured them.
    """
    from inference.compare import (CONTROLLED, METHODS as ALL_METHODS, build_trigger, measure_costs,
                                   modeled_costs, plot_comparison, weight_bytes, write_comparison)
    from inference.evaluate import run_controlled, run_method, summarize, write_evaluation
    from inference.models import load_full_precision, load_quantized
    from inference.storage import folder_written_atomically
    from inference.tracking import start_run
    from training.benchmarks import load_benchmark

    methods = tuple(methods or ALL_METHODS)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise RescueError(f"unknown method {unknown[0]!r} (expected one of {', '.join(ALL_METHODS)})")
    if limit is not None and limit < 1:
        raise RescueError(f"--limit must be a positive integer, got {limit}")
    _check_methods(config, methods)
    projection = None
    if costs_file is not None:
        from inference.compare import load_projection
        from inference.shapes import QWEN3_SHAPES

        shape = shape or config.model.name
        if shape not in QWEN3_SHAPES:
            raise RescueError(f"--shape {shape!r} is not a Qwen3 shape (expected one of {', '.join(QWEN3_SHAPES)})")
        try:
            projection = load_projection(costs_file, shape, config.sampling.batch_size)
        except ValueError as error:
            raise RescueError(str(error)) from None
    bench = config.benchmark
    problems = load_benchmark(bench.name, bench.split, bench.path, limit=limit)
    need_fp16 = any(m != "2bit" for m in methods)
    need_2bit = any(m != "fp16" for m in methods)
    warn_mismatches(config, two_bit=need_2bit)
    models, tokenizer = {}, None
    if need_2bit:
        models["2bit"], tokenizer = load_quantized(config.quantized_path, config.model.device, config.model.kernel,
                                                   config.model.dtype)
    if need_fp16:
        models["fp16"], tokenizer = load_full_precision(config.model.fp16, config.model.dtype, config.model.device)
    detector = None
    if "learned" in methods:
        from detector.artifact import load_detector

        folder = config.rescue.detector or str(Path(config.output_dir) / config.model.name / "detector")
        detector = load_detector(folder, config.model.name, models["2bit"].config.hidden_size, config.probe.layers)
    triggers = {m: build_trigger(m, config, tokenizer, detector) for m in methods if m in CONTROLLED}

    out_dir = Path(out or Path(config.output_dir) / config.model.name / f"compare-{bench.name}-{bench.split}")
    name = f"{config.model.name}-{methods[0] if single else 'compare'}-{bench.name}"
    run = start_run(config.wandb.mode, config.wandb.project, name, "evaluate" if single else "compare",
                    {**config.to_dict(), "methods": list(methods), "limit": limit}, out_dir.parent)
    began = time.perf_counter()
    costs = weights = None
    if not single and {"2bit", "fp16"} <= set(models):
        costs = measure_costs(models, tokenizer, [p.question for p in problems], config.sampling.batch_size)
        from inference.models import resolve_model_source

        weights = weight_bytes(resolve_model_source(config.model.fp16, "model"), config.quantized_path)
    summaries, all_records = {}, {}
    for method in methods:
        started = time.perf_counter()
        if method in ("fp16", "2bit"):
            records = run_method(models[method], tokenizer, problems, method=method, sampling=config.sampling,
                                 progress=progress)
        else:
            records = run_controlled(models, tokenizer, problems, method=method, trigger=triggers[method],
                                     sampling=config.sampling, control=config.rescue, progress=progress)
        summary = summarize(records)
        summary.update(model=config.model.name, benchmark=bench.name, split=bench.split,
                       total_wall_seconds=round(time.perf_counter() - started, 2))
        if costs is not None:
            summary.update(modeled_costs(records, costs, weights, projection))
        summaries[method], all_records[method] = summary, records
        if single:
            write_evaluation(out_dir, records, summary)
        if progress:
            print(format_summary(summary))
    if not single:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        meta = {"model": config.model.name, "benchmark": bench.name, "split": bench.split,
                "problems": len(problems), "seed": config.sampling.seed, "device": device,
                "total_wall_seconds": round(time.perf_counter() - began, 1)}
        with folder_written_atomically(out_dir) as staging:
            for method, records in all_records.items():
                write_evaluation(staging / method, records, summaries[method])
            if costs is not None:
                write_comparison(staging, summaries, costs, weights, meta, projection)
                plot_comparison(summaries, all_records, staging)
        if progress and costs is not None:
            print((out_dir / "comparison.md").read_text())
    if run is not None:
        for method, records in all_records.items():
            log_evaluation(run, records, summaries[method], prefix="" if single else f"{method}/")
        if not single:
            import wandb

            run.log({png.stem: wandb.Image(str(png)) for png in sorted(out_dir.glob("*.png"))})
        run.finish()
    print(f"evaluation record: {out_dir}")
    return summaries[methods[0]] if single else {"out": str(out_dir), "methods": summaries, "costs": costs}


def log_evaluation(run, records, summary, prefix: str = "") -> None:
    import wandb

    columns = ["problem_id", "generated_tokens", "tokens_2bit", "tokens_fp16", "actions", "finish_reason", "answer",
               "gold", "correct"]
    table = wandb.Table(columns=columns)
    for r in records:
        table.add_data(r.problem_id, r.generated_tokens, r.tokens_2bit, r.tokens_fp16,
                       ",".join(a["kind"] for a in r.actions), r.finish_reason, r.answer, r.gold, r.correct)
    run.log({f"{prefix}records": table})
    run.summary.update({f"{prefix}{k}": v for k, v in summary.items() if isinstance(v, (int, float, str))})
    for group in ("finish_reasons", "actions"):
        for key, count in summary[group].items():
            run.summary[f"{prefix}{group}/{key}"] = count


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


def newest_checkpoint(folder: Path) -> Path:
    """The epoch checkpoint with the highest epoch in `folder` (as `rescue pretrain` names them)."""
    import re

    found = []
    for path in folder.glob("*.ckpt"):
        match = re.match(r"epoch=(\d+)-step=(\d+)", path.name)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), path.stat().st_mtime, path))
    if not found:
        raise ConfigError(f"pretrain --resume: no epoch checkpoint (epoch=N-step=M.ckpt) in {folder}")
    return max(found)[-1]


def check_weights_fit(saved: dict, model, flag: str, source) -> None:
    """Refuse saved weights that do not have `model`'s names and shapes, naming the first that differs."""
    for name, tensor in model.state_dict().items():
        found = tuple(saved[name].shape) if name in saved else None
        if found != tuple(tensor.shape):
            raise ConfigError(f"pretrain {flag}: {source} does not fit the config's model: {name} is "
                              f"{'missing' if found is None else found} there, the config makes it "
                              f"{tuple(tensor.shape)}")


def check_checkpoint_fits(checkpoint: Path, module) -> None:
    """Refuse a checkpoint whose weights do not have the configured model's names and shapes."""
    import torch

    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    except Exception as error:
        raise ConfigError(f"pretrain --resume: cannot read {checkpoint}: {error}") from None
    check_weights_fit(saved, module, "--resume", checkpoint)


def init_weights_from(folder: str, saved: dict, module) -> None:
    """Load a saved family model's weights into `module.model`, refusing one of another architecture."""
    check_weights_fit(saved, module.model, "--init", folder)
    module.model.load_state_dict(saved, strict=False)  # tied head: lm_head.weight is embed_tokens.weight


def pretrain(config: RescueConfig, out: str | None = None, resume: bool = False, init: str | None = None) -> dict:
    """Train an embedded family model (architecture and recipe in the config's `pretrain` section).

    With `resume`, training continues from the newest epoch checkpoint of an earlier run with the
    same config (weights, optimizer, learning-rate schedule and epoch count come from it). With
    `init`, training starts from the weights of a saved model folder of the same architecture, with
    a fresh optimizer and schedule: continued training, on the traces of `pretrain.seed` (set another
    seed than the first run's for fresh ones)."""

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from inference.storage import folder_written_atomically
    from training.pretrain import ArithTraceData, ReasonerLM, count_parameters, family_config
    from training.tokenizer import build_tokenizer

    spec = config.pretrain
    if resume and init:
        raise ConfigError("pretrain: --resume and --init exclude each other (resume continues a run; init starts one "
                          "from saved weights)")
    out_dir = Path(out or config.model.fp16)
    run_dir = Path(config.output_dir) / config.model.name / "pretrain"
    checkpoint = newest_checkpoint(run_dir / "checkpoints") if resume else None
    if init:  # read before the traces are made, so a bad folder fails at once
        from transformers.utils import logging as hf_logging

        from inference.models import load_full_precision

        hf_logging.disable_progress_bar()  # a bad folder's error stays the one line printed
        try:
            initial = load_full_precision(init, "float32", "cpu")[0].state_dict()
        finally:
            hf_logging.enable_progress_bar()
    tokenizer = build_tokenizer()
    L.seed_everything(spec.seed, verbose=False)
    data = ArithTraceData(tokenizer, spec)
    try:
        data.setup()
    except ValueError as error:  # a trace style no problem can be written in (e.g. max_trace_chars too small)
        raise ConfigError(f"pretrain: {error}") from None
    steps = (len(data.train_set) // spec.batch_size) * spec.epochs
    module = ReasonerLM(family_config(spec, tokenizer), spec, steps)
    if checkpoint:
        check_checkpoint_fits(checkpoint, module)
    if init:
        init_weights_from(init, initial, module)
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
    if checkpoint:
        print(f"resuming from {checkpoint}")
    trainer.fit(module, data, ckpt_path=checkpoint)
    seconds = time.perf_counter() - began
    if "val/loss" not in trainer.callback_metrics:  # resumed from the last epoch's checkpoint: nothing ran
        trainer.validate(module, data, verbose=False)
    model = module.model.to(torch.float16).cpu()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    record = {
        "model": config.model.name,
        "parameters": parameters,
        "train_traces": len(data.train_set),
        "epochs": spec.epochs,
        "steps": steps,
        "seed": spec.seed,
        "trace_style": dataclasses.asdict(spec.trace_style()),
        "recipe": dataclasses.asdict(spec),
        "resumed_from": str(checkpoint) if checkpoint else None,
        "initialized_from": str(init) if init else None,
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
    return load_quantized(config.quantized_path, config.model.device, config.model.kernel, config.model.dtype,
                          bits=config.quantization.bits)


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
    return summary


def label(config: RescueConfig, traces: str, report: str | None = None) -> dict:
    """Label every trace of a trace set (from token ids and text alone) and write the label report.

    Labels go to `<traces>/labels.json` together with the parameters used, so relabeling with other
    parameters rewrites that file and never needs a new collection.
    """
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

    summary = compare_offline(config, test, detector=detector, out=out)
    report = Path(summary["out"]) / "report.md"
    if report.is_file():
        print(report.read_text())
    print(f"detect report: {summary['out']}")
    return summary


# -- the main job -------------------------------------------------------------------------------------


def _quantize_record(config: RescueConfig) -> dict | None:
    """The `rescue_quantize.json` of the config's 2-bit folder, or None where there is none to read."""
    try:
        return json.loads((Path(config.quantized_path) / "rescue_quantize.json").read_text())
    except (OSError, ValueError):
        return None


def _same_model(recorded, configured: str) -> bool | None:
    """Whether two model references name the same folder; None where either cannot be resolved."""
    from inference.models import resolve_model_source

    try:
        return (resolve_model_source(str(recorded), "model").resolve()
                == resolve_model_source(configured, "model").resolve())
    except RescueError:
        return None


def _quantized_matches(config: RescueConfig) -> bool:
    """Whether the config's 2-bit folder was made by `rescue quantize` from this model with these settings."""
    from dataclasses import asdict

    made = _quantize_record(config)
    if made is None or not _same_model(made.get("fp16"), config.model.fp16):
        return False
    # Records written before keep_fp16 existed quantized every linear, which is what [] means.
    recorded = {"keep_fp16": [], **(made.get("quantization") or {})}
    return recorded == asdict(config.quantization)


def twin_mismatch(config: RescueConfig) -> str | None:
    """A warning when the 2-bit folder was quantized from another model than `model.fp16`.

    Silent where that cannot be told: a folder not made by `rescue quantize`, or a recorded source
    that is not at hand (a twin made on another machine).
    """
    made = _quantize_record(config)
    if made is None or _same_model(made.get("fp16"), config.model.fp16) is not False:
        return None
    return (f"warning: {config.quantized_path} was quantized from {made.get('fp16')} (its rescue_quantize.json), "
            f"not from model.fp16 {config.model.fp16}; its 2-bit results are not that model's")


def _detector_matches(config: RescueConfig, folder: Path, trace_sets: list[Path]) -> bool:
    """Whether the detector in `folder` was trained on exactly these (labeled) trace sets with this recipe."""
    from dataclasses import asdict

    from training.datamodule import manifest_sha256

    try:
        card = json.loads((folder / "card.json").read_text())
        trained_on = sorted(source["manifest_sha256"] for source in card["training_data"])
        labels_then = card["label_params"]
        recipe_then = card["training"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    current = sorted(manifest_sha256(path) for path in trace_sets)
    return (trained_on == current and labels_then == asdict(config.labels)
            and recipe_then == asdict(config.detector))


def run(config: RescueConfig, train_limit: int | None = None, val_limit: int | None = None,
        test_limit: int | None = None, out: str | None = None) -> dict:
    """The main job: quantize, collect and label train/val traces, train the detector, compare every
    method on the test split, and write a report folder (summary.md, report.json, PNG plots).

    Stages whose outputs exist and match the config are skipped: the 2-bit model (its
    rescue_quantize.json), trace sets (a complete set with the same identity; a partial one resumes),
    the detector (trained on the same trace-set manifests with the same labels and recipe).
    """
    import shutil

    from inference.storage import folder_written_atomically

    limits = {"train": train_limit or config.rescue.run_train_problems,
              "val": val_limit or config.rescue.run_val_problems,
              "test": test_limit or config.rescue.run_test_problems}
    for split, value in limits.items():
        if value < 1:
            raise RescueError(f"--{split}-limit must be a positive integer, got {value}")
    root = Path(config.output_dir) / config.model.name
    report_dir = Path(out or root / "report")
    stages: list[dict] = []
    started = time.perf_counter()

    def stage(number: int, name: str, skipped: bool = False):
        print(f"\n== [{number}/6] {name}{' (up to date, skipped)' if skipped else ''} ==", flush=True)
        stages.append({"stage": name, "skipped": skipped, "began": time.perf_counter()})

    def done() -> None:
        stages[-1]["seconds"] = round(time.perf_counter() - stages[-1].pop("began"), 1)

    fresh = _quantized_matches(config)
    stage(1, f"quantize {config.model.name} to {config.quantization.bits} bits", skipped=fresh)
    if not fresh:
        quantize(config)
    done()

    trace_sets, labels = {}, {}
    for number, split in ((2, "train"), (3, "val")):
        folder = root / f"run-traces-{split}-{limits[split]}"
        stage(number, f"collect 2-bit traces of {limits[split]} {config.benchmark.name}/{split} problems and label them")
        collect(config, split=split, limit=limits[split], out=str(folder))
        labels[split] = label(config, str(folder))
        trace_sets[split] = folder
        done()

    detector_dir = Path(config.rescue.detector or root / "detector")
    current = _detector_matches(config, detector_dir, list(trace_sets.values()))
    stage(4, "train the detector", skipped=current)
    if not current:
        from training.fit import train_detector

        train_detector(config, str(trace_sets["train"]), val=str(trace_sets["val"]), out=str(detector_dir))
    done()
    config.rescue.detector = str(detector_dir)
    config.benchmark.split = "test"

    stage(5, f"compare every method on {limits['test']} {config.benchmark.name}/test problems")
    comparison = compare(config, limit=limits["test"], out=str(root / "run-compare"))
    done()

    stage(6, "write the report")
    card = json.loads((detector_dir / "card.json").read_text())
    compare_dir = Path(comparison["out"])
    with folder_written_atomically(report_dir) as staging:
        for png in sorted(compare_dir.glob("*.png")):
            shutil.copy2(png, staging / png.name)
        label_pngs = sorted((trace_sets["train"] / "label-report").glob("*.png"))
        for png in label_pngs:
            shutil.copy2(png, staging / f"train-{png.name}")
        done()
        summary = {"model": config.model.name, "limits": limits, "stages": stages,
                   "total_seconds": round(time.perf_counter() - started, 1),
                   "labels": labels, "detector": {"artifact": str(detector_dir), "metrics": card.get("metrics"),
                                                  "calibration": card.get("calibration")},
                   "comparison": comparison["methods"], "costs": comparison["costs"],
                   "goals": rescue_goals(comparison["methods"])}
        (staging / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (staging / "summary.md").write_text(_report_markdown(summary, compare_dir))
    print((report_dir / "summary.md").read_text())
    print(f"report: {report_dir}")
    return summary


def rescue_goals(methods: dict) -> list[dict]:
    """The rescue issue's goals, checked on a comparison (each with the figures it was judged on)."""
    goals = []
    fp16, naive = methods.get("fp16"), methods.get("2bit")
    if not (fp16 and naive):
        return goals
    gap = fp16["accuracy"] - naive["accuracy"]
    for name in ("rule", "learned"):
        s = methods.get(name)
        if s and gap > 0:
            recovered = (s["accuracy"] - naive["accuracy"]) / gap
            goals.append({"goal": f"{name} rescue recovers most of the 2-bit gap", "value": f"{recovered:.0%} of the gap",
                          "met": recovered > 0.5})
    learned, rule = methods.get("learned"), methods.get("rule")
    if learned and rule:
        goals.append({"goal": "learned matches or beats the rule's accuracy",
                      "value": f"{learned['accuracy']:.1%} vs {rule['accuracy']:.1%}",
                      "met": learned["accuracy"] >= rule["accuracy"]})
        total = lambda s: s["mean_tokens_2bit"] + s["mean_tokens_fp16"]  # noqa: E731
        goals.append({"goal": "learned spends fewer total tokens than the rule",
                      "value": f"{total(learned):.0f} vs {total(rule):.0f}", "met": total(learned) < total(rule)})
        goals.append({"goal": "learned spends fewer FP16 tokens than the rule",
                      "value": f"{learned['mean_tokens_fp16']:.0f} vs {rule['mean_tokens_fp16']:.0f}",
                      "met": learned["mean_tokens_fp16"] < rule["mean_tokens_fp16"]})
    if learned:
        share = learned["accuracy"] / fp16["accuracy"] if fp16["accuracy"] else 0.0
        goals.append({"goal": "learned reaches >= 95% of FP16 accuracy", "value": f"{share:.0%}", "met": share >= 0.95})
        for key, label in (("modeled_seconds", "modeled time"), ("weight_bytes_read", "memory-bound cost")):
            if fp16.get(key):
                ratio = learned[key] / fp16[key]
                goals.append({"goal": f"learned costs <= half of FP16 ({label})", "value": f"{ratio:.2f}x",
                              "met": ratio <= 0.5})
    return goals


def _report_markdown(summary: dict, compare_dir: Path) -> str:
    lines = [f"# lowbit-rescue run: {summary['model']}", "",
             f"Problems: {summary['limits']['train']} train / {summary['limits']['val']} val traces collected, "
             f"{summary['limits']['test']} test problems compared. Total {summary['total_seconds']:.0f} s.", "",
             "| stage | seconds | |", "| --- | --- | --- |"]
    lines += [f"| {s['stage']} | {s.get('seconds', 0):.1f} | {'skipped' if s['skipped'] else ''} |"
              for s in summary["stages"]]
    comparison = (compare_dir / "comparison.md").read_text().split("\n", 2)[2] if (compare_dir / "comparison.md").is_file() else ""
    lines += ["", "## Methods on the test split", "", comparison.strip(), "", "## Goals", ""]
    lines += [f"- {'met' if g['met'] else 'NOT met'}: {g['goal']} ({g['value']})" for g in summary["goals"]]
    val = (summary["detector"].get("metrics") or {}).get("val", {})
    if val:
        lines += ["", "## Detector (validation traces)", ""]
        lines += [f"- {key}: {value:.3f}" for key, value in val.items() if isinstance(value, float)]
    for split, report in summary["labels"].items():
        rates = report.get("rates") or {}
        if rates:
            lines += ["", f"## Labels of the {split} traces", ""]
            lines += [f"- {key}: {value:.1%}" for key, value in rates.items() if isinstance(value, float)]
    lines += ["", "Plots: accuracy-vs-cost.png, tokens.png, train-*.png (label report). Per-method records: "
              f"{compare_dir}.", ""]
    return "\n".join(lines)
