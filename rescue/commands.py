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
from typing import TYPE_CHECKING, Sequence

from inference.config import RescueConfig
from inference.errors import ConfigError, RescueError

if TYPE_CHECKING:
    from training.texts import TextFields

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
            shape: str | None = None, echo_table: bool = True) -> dict:
    """Every method on the same problems with the same seeds: records, table, plots, W&B.

    Writes `<out>/<method>/records.jsonl|summary.json`, `comparison.md|json` and the plots (default
    `<output_dir>/<model>/compare-<benchmark>-<split>`). With `single` (rescue evaluate), one method
    is written straight into `out`. `costs_file` (a `benchmarks/decode.py` JSON) adds projected seconds
    at the Qwen3 `shape` (default: the config's model name) on the machine that measured them.
    """
    from inference.compare import (CONTROLLED, METHODS as ALL_METHODS, build_trigger, learned_budget, measure_costs,
                                   modeled_costs, plot_comparison, weight_bytes, write_comparison)
    from inference.evaluate import run_controlled, run_method, summarize, write_evaluation
    from inference.models import load_full_precision, load_quantized
    from inference.storage import folder_written_atomically
    from inference.tracking import stage_config, start_run
    from training.benchmarks import load_benchmark

    from training.ceilings import CEILINGS, ceiling_rows, ceiling_trigger

    methods = tuple(methods or default_methods(config))
    for method in methods:
        if method in ALL_METHODS or method in CEILINGS:
            continue
        if not method.startswith("learned@"):
            raise RescueError(f"unknown method {method!r} (expected one of {', '.join(ALL_METHODS + CEILINGS)}, "
                              "or learned@B with an FP16 budget B in [0, 1])")
        try:
            learned_budget(method, config)
        except ValueError as error:
            raise RescueError(str(error)) from None
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
    detector = folder = None
    if any(learned_budget(m, config) is not None for m in methods):
        from detector.artifact import load_detector

        folder = config.rescue.detector or str(Path(config.output_dir) / config.model.name / "detector")
        detector = load_detector(folder, config.model.name, models["2bit"].config.hidden_size, config.probe.layers)
        if not detector.has_decision_heads:
            policy = (detector.card["calibration"].get("policy") or {}).get("skipped", "a two-head detector")
            print(f"note: {folder} has no learned action policy ({policy}); the learned trigger commits to the "
                  "earliest candidate, and the budget curve (learned@B) is left out")
            methods = tuple(m for m in methods if not m.startswith("learned@"))
    triggers = {m: build_trigger(m, config, tokenizer, detector) for m in methods
                if m in CONTROLLED or learned_budget(m, config) is not None}
    controls = {m: config.rescue for m in triggers}
    for method in methods:
        if method in CEILINGS:
            triggers[method], controls[method] = ceiling_trigger(method, config, tokenizer, problems)

    out_dir = Path(out or Path(config.output_dir) / config.model.name / f"compare-{bench.name}-{bench.split}")
    name = f"{config.model.name}-{methods[0] if single else 'compare'}-{bench.name}"
    job_type = "evaluate" if single else "compare"
    run = start_run(config.wandb.mode, config.wandb.project, name, job_type,
                    stage_config(config, job_type, methods=list(methods), limit=limit), out_dir.parent)
    began = time.perf_counter()
    costs = weights = None
    if not single and {"2bit", "fp16"} <= set(models):
        costs = measure_costs(models, tokenizer, [p.question for p in problems], config.sampling.batch_size)
        from inference.models import resolve_model_source

        weights = weight_bytes(resolve_model_source(config.model.fp16, "model"), config.quantized_path)
    summaries, all_records, ceilings = {}, {}, []
    for method in methods:
        started = time.perf_counter()
        if method in ("fp16", "2bit"):
            records = run_method(models[method], tokenizer, problems, method=method, sampling=config.sampling,
                                 progress=progress)
        else:
            records = run_controlled(models, tokenizer, problems, method=method, trigger=triggers[method],
                                     sampling=config.sampling, control=controls[method], progress=progress)
        summary = summarize(records)
        if method in triggers:
            summary["policy"] = triggers[method].policy_name
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
            ceilings = ceiling_rows(summaries, all_records, weights)
            rule_check = None
            if "2bit" in all_records:
                from dataclasses import asdict as _asdict

                from training.replay import rule_false_alarm_line, rule_on_records

                # The rule's loop check replayed on the naive 2-bit traces: its false alarms on healthy ones.
                rule_check = rule_on_records([_asdict(r) for r in all_records["2bit"]], tokenizer, config.rescue,
                                             config.labels)
                rule_check["line"] = rule_false_alarm_line(rule_check)
                meta["rule_loop_check"] = rule_check
            if costs is not None:
                write_comparison(staging, summaries, costs, weights, meta, projection, ceilings)
                plot_comparison(summaries, all_records, staging, ceilings)
        if progress and echo_table and costs is not None:
            print((out_dir / "comparison.md").read_text())
    if run is not None:
        log_comparison(run, config.model.name, all_records, summaries, None if single else out_dir,
                       detector=folder)
    print(f"evaluation record: {out_dir}")
    return summaries[methods[0]] if single else {"out": str(out_dir), "methods": summaries, "costs": costs,
                                                  "ceilings": ceilings}


def default_methods(config: RescueConfig) -> tuple[str, ...]:
    """What `rescue compare` runs by default: every method, the learned trigger at each of
    `rescue.curve_budgets`, and the oracle ceilings (the step oracle on generated arithmetic only)."""
    from inference.compare import METHODS as ALL_METHODS
    from training.ceilings import CEILINGS

    curve = tuple(f"learned@{budget:g}" for budget in config.rescue.curve_budgets
                  if abs(budget - config.rescue.fp16_budget) > 1e-9)
    ceilings = tuple(c for c in CEILINGS if c != "ceiling-step" or config.benchmark.name.startswith("arith"))
    return ALL_METHODS + curve + ceilings


RUN_LEAVES_OUT = ("plan-only", "rescue-only", "ceiling-loop")
"""Methods `rescue compare` runs by default and the main job does not, to fit in minutes on a CPU."""


def run_methods(config: RescueConfig) -> tuple[str, ...]:
    """What `rescue run` compares: `default_methods` without `RUN_LEAVES_OUT`, and of the learned curve only
    its smallest budget (with `learned` at `rescue.fp16_budget` and the naive 2-bit point, three points)."""
    methods = [m for m in default_methods(config) if m not in RUN_LEAVES_OUT]
    curve = [m for m in methods if m.startswith("learned@")]
    smallest = min(curve, key=lambda m: float(m.split("@", 1)[1]), default=None)
    return tuple(m for m in methods if not m.startswith("learned@") or m == smallest)


def log_comparison(run, model_name: str, all_records: dict, summaries: dict, out_dir: Path | None,
                   detector: str | None = None) -> None:
    """W&B: per-method records and `<method>/<metric>` summaries, the comparison as one table plus its plots
    and artifact (with `out_dir`), and the detector it used as an input; then the run is finished."""
    import wandb

    from inference.tracking import comparison_artifact, comparison_table, detector_artifact, method_metrics
    from inference.tracking import use_artifacts

    if detector is not None and (Path(detector) / "card.json").is_file():
        use_artifacts(run, [detector_artifact(detector, model_name)])
    columns = ["problem_id", "generated_tokens", "tokens_2bit", "tokens_fp16", "actions", "finish_reason", "answer",
               "gold", "correct"]
    for method, records in all_records.items():
        table = wandb.Table(columns=columns)
        for r in records:
            table.add_data(r.problem_id, r.generated_tokens, r.tokens_2bit, r.tokens_fp16,
                           ",".join(a["kind"] for a in r.actions), r.finish_reason, r.answer, r.gold, r.correct)
        run.log({f"{method}/records": table})
        run.summary.update(method_metrics(method, summaries[method]))
    run.log({"comparison": comparison_table(model_name, summaries)})
    if out_dir is not None:
        run.log({png.stem: wandb.Image(str(png)) for png in sorted(out_dir.glob("*.png"))})
        if (out_dir / "comparison.json").is_file():
            run.log_artifact(comparison_artifact(out_dir, model_name))
    run.finish()


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


def label(config: RescueConfig, traces: str | None = None, report: str | None = None, texts: str | None = None,
          tokenizer: str | None = None, fields: TextFields | None = None, echo: bool = True) -> dict:
    """Label every trace of a trace set (from token ids and text alone) and write the label report.

    Labels go to `<traces>/labels.json` together with the parameters used, so relabeling with other
    parameters rewrites that file and never needs a new collection. With `texts` (a JSONL file that
    another harness wrote, its fields named by `fields`, a `training.texts.TextFields`) the traces
    are tokenized with `tokenizer` (a folder or id; default the config's FP16 model's) and get every
    text-level label; labels.json and the report go to `report` (default
    `<output_dir>/<file stem>-labels`). Without `echo` (inside `rescue run`) the report is not printed,
    only where it went.
    """
    from dataclasses import asdict

    from inference.storage import write_atomically
    from inference.tracking import labels_artifact, stage_config, start_run, trace_set_artifact, use_artifacts
    from training.labels import label_report, label_trace, loop_excerpt, token_char_ends
    from training.traces import LABELS, TraceSet, TraceSetError

    if (traces is None) == (texts is None):
        raise RescueError("label: give either a trace set folder or --texts FILE.jsonl")
    notes: list[str] = []
    excerpts: list[str] = []
    if texts is not None:
        from training.texts import TextFields, label_texts, load_text_tokenizer, read_texts

        fields = fields or TextFields()
        foreign = read_texts(texts, fields)
        text_tokenizer = load_text_tokenizer(tokenizer or config.model.fp16)
        labeled = label_texts(foreign, text_tokenizer, config.labels)
        labels = {item.trace.id: item.labels for item in labeled}
        for item in labeled:
            if item.labels.loop_onset is not None and len(excerpts) < EXCERPTS:
                excerpts.append(loop_excerpt(item.text, item.token_ends, item.ids, item.labels, item.trace.id))
        inferred = sum(item.trace.finish_inferred for item in labeled)
        graded = sum(item.trace.gold is not None for item in labeled)
        notes = [f"Traces: {texts}, tokenized with {tokenizer or config.model.fp16}.",
                 f"Finish reason inferred for {inferred} of {len(labeled)} traces (no `{fields.finish_reason}` "
                 "field: budget where `</think>` never came, else EOS)." if inferred else "",
                 f"Correctness graded against `{fields.gold}` for {graded} traces"
                 + (f", taken from `{fields.correct}` for {len(labeled) - graded} (null counts as not correct)."
                    if graded < len(labeled) else ".")]
        notes = [line for line in notes if line]
        out = Path(report or Path(config.output_dir) / f"{Path(texts).stem}-labels")
        labels_path, report_dir, name, source = out / LABELS, out, Path(texts).stem, str(texts)
        out.mkdir(parents=True, exist_ok=True)
    else:
        from inference.models import load_tokenizer, resolve_model_source
        from training.collect import tokenizer_hash

        trace_set = TraceSet(traces)
        identity = trace_set.identity
        trace_tokenizer = load_tokenizer(resolve_model_source(identity["model"]["fp16"], "model"))
        if tokenizer_hash(trace_tokenizer) != identity["tokenizer_hash"]:
            raise TraceSetError(f"{traces}: collected with another tokenizer than {identity['model']['fp16']}'s")
        labels = {}
        for trace in trace_set.traces(with_hidden=False):
            ends = token_char_ends(trace_tokenizer, trace.generated_ids)
            labels[trace.id] = label_trace(trace.generated_ids, trace.text, ends, trace.finish_reason, trace.gold,
                                           config.labels)
            if labels[trace.id].loop_onset is not None and len(excerpts) < EXCERPTS:
                excerpts.append(loop_excerpt(trace.text, ends, trace.generated_ids, labels[trace.id], str(trace.id)))
        if not labels:
            raise TraceSetError(f"{traces}: the trace set holds no traces")
        labels_path = Path(traces) / LABELS
        report_dir = Path(report or Path(traces) / "label-report")
        name, source = identity["model"]["name"], str(traces)
    record = {"params": asdict(config.labels), "traces": {k: v.to_dict() for k, v in labels.items()}}
    if texts is not None:
        record["texts"] = {"file": str(texts), "tokenizer": tokenizer or config.model.fp16, "fields": asdict(fields)}
    write_atomically(labels_path, json.dumps(record).encode())
    summary = label_report(list(labels.values()), report_dir, excerpts=excerpts, notes=notes)
    run = start_run(config.wandb.mode, config.wandb.project, f"{name}-label", "label",
                    stage_config(config, "label", traces=source), labels_path.parent.parent)
    if run is not None:
        import wandb

        if traces is not None:  # a trace set's lineage; foreign texts have no trace set artifact
            use_artifacts(run, [trace_set_artifact(traces, name)])
        run.summary.update({k: v for k, v in _flatten(summary).items() if isinstance(v, (int, float, str))})
        run.log({png.stem: wandb.Image(str(png)) for png in sorted(report_dir.glob("*.png"))})
        if traces is not None:
            run.log_artifact(labels_artifact(traces, name))
        run.finish()
    if echo:
        print((report_dir / "label-report.md").read_text())
    print(f"labels: {labels_path}; report: {report_dir}")
    return summary


# Loops shown in a label report, the first ones in file order.
EXCERPTS = 3


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


def detect_report(config: RescueConfig, test: str | None = None, detector: str | None = None, out: str | None = None,
                  texts: str | None = None, tokenizer: str | None = None, fields: TextFields | None = None,
                  text_only: bool = False,
                  target: float = 0.1) -> dict:
    """Replay held-out traces with the learned trigger and the rule, at the same false-alarm rate,
    and state the configured rule's false-alarm rate on the healthy ones.

    Text only (`texts`, another harness's JSONL read with `fields` and `tokenizer`; or `text_only`
    on a labeled trace set): no hidden states, so only the rule is replayed: as configured, as the
    paper-like default, and calibrated on these traces for `target` false alarms per healthy trace.
    """
    from training.replay import replay_report, rule_false_alarm_line, rule_outcomes, rule_setting

    if texts is None and test is None:
        raise RescueError("detect-report: give --test TRACE_SET or --texts FILE.jsonl")
    if not 0.0 <= target < 1.0:
        raise RescueError(f"detect-report: --target must be a false-alarm rate in [0, 1), got {target}")
    if texts is not None or text_only:
        from training.labels import loop_excerpt

        pairs, excerpts, notes = [], [], []
        if texts is not None:
            from training.texts import TextFields, label_texts, load_text_tokenizer, read_texts

            labeled = label_texts(read_texts(texts, fields or TextFields()),
                                  load_text_tokenizer(tokenizer or config.model.fp16), config.labels)
            for item in labeled:
                pairs.append((item.ids, item.labels))
                if item.labels.loop_onset is not None and len(excerpts) < EXCERPTS:
                    excerpts.append(loop_excerpt(item.text, item.token_ends, item.ids, item.labels, item.trace.id))
            notes.append(f"Tokenized with {tokenizer or config.model.fp16}; labeled with the config's `labels`.")
            source = str(texts)
        else:
            pairs = _labeled_ids(test)
            source = str(test)
        default = Path(config.output_dir) / config.model.name / "detect-report-text"
        summary = replay_report(pairs, rule_setting(config.rescue), target, source, out or default,
                                excerpts=excerpts, notes=notes)
    else:
        from training.fit import detect_report as compare_offline

        summary = compare_offline(config, test, detector=detector, out=out)
        configured = rule_outcomes(_labeled_ids(test), rule_setting(config.rescue))
        summary["configured_rule"] = {k: v for k, v in configured.items() if k != "alarms"}
        line = rule_false_alarm_line(configured)
        report = Path(summary["out"]) / "report.md"
        if report.is_file():
            report.write_text(report.read_text().rstrip("\n") + f"\n\nAs configured (`rescue.rule_*`), the {line}.\n")
        (Path(summary["out"]) / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = Path(summary["out"]) / "report.md"
    if report.is_file():
        print(report.read_text())
    print(f"detect report: {summary['out']}")
    return summary


def _labeled_ids(test: str) -> list[tuple[list[int], object]]:
    """(generated ids, labels) of every trace of a labeled trace set."""
    from training.datamodule import load_labels
    from training.traces import TraceSet, TraceSetError

    labels, _ = load_labels(test)
    pairs = []
    for trace in TraceSet(test).traces(with_hidden=False):
        if trace.id not in labels:
            raise TraceSetError(f"{test}: labels.json has no labels for trace {trace.id!r}; rerun `rescue label {test}`")
        pairs.append((list(trace.generated_ids), labels[trace.id]))
    return pairs


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
    the detector (trained on the same trace-set manifests with the same labels and recipe). One W&B
    group holds the stages' runs and the report run.
    """
    from inference.tracking import experiment

    limits = {"train": train_limit or config.rescue.run_train_problems,
              "val": val_limit or config.rescue.run_val_problems,
              "test": test_limit or config.rescue.run_test_problems}
    for split, value in limits.items():
        if value < 1:
            raise RescueError(f"--{split}-limit must be a positive integer, got {value}")
    root = Path(config.output_dir) / config.model.name
    with experiment(f"{config.model.name}-run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"):
        return _run_stages(config, limits, root, Path(out or root / "report"))


def _run_stages(config: RescueConfig, limits: dict, root: Path, report_dir: Path) -> dict:
    import shutil

    from inference.storage import folder_written_atomically

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
        labels[split] = label(config, str(folder), echo=False)
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
    comparison = compare(config, limit=limits["test"], methods=run_methods(config), out=str(root / "run-compare"),
                         echo_table=False)
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
                   "ceilings": comparison["ceilings"],
                   "goals": rescue_goals(comparison["methods"], comparison["ceilings"], config.model.name)}
        (staging / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (staging / "summary.md").write_text(_report_markdown(summary, compare_dir))
    _track_report(config, summary, compare_dir, report_dir)
    comparison_md = compare_dir / "comparison.md"
    if comparison_md.is_file():
        print("\n" + comparison_md.read_text().split("\n", 2)[2].strip())
    print("\n" + "\n".join(f"- {'met' if g['met'] else 'NOT met'}: {g['goal']} ({g['value']})" for g in summary["goals"]))
    print(f"\nreport: {report_dir / 'summary.md'}")
    print(f"plot: {report_dir / 'accuracy-vs-cost.png'}")
    return summary


def _track_report(config: RescueConfig, summary: dict, compare_dir: Path, report_dir: Path) -> None:
    """W&B: the group's report run, holding the whole config (logged once per `rescue run`), the comparison
    (as input artifact, one table, the plots) and the goals."""
    from inference.tracking import comparison_artifact, comparison_table, start_run, use_artifacts

    run = start_run(config.wandb.mode, config.wandb.project, f"{config.model.name}-report", "report",
                    config.to_dict(), report_dir.parent)
    if run is None:
        return
    import wandb

    if (compare_dir / "comparison.json").is_file():
        use_artifacts(run, [comparison_artifact(compare_dir, config.model.name)])
    run.log({"comparison": comparison_table(config.model.name, summary["comparison"]),
             **{png.stem: wandb.Image(str(png)) for png in sorted(report_dir.glob("*.png"))}})
    run.summary.update({f"goals/{g['goal']}": g["met"] for g in summary["goals"]})
    run.summary["total_seconds"] = summary["total_seconds"]
    run.finish()


def rescue_goals(methods: dict, ceilings: Sequence[dict] = (), model: str = "") -> list[dict]:
    """The rescue issue's goals, checked on a comparison (each with the figures it was judged on).

    Recovery target: 40% of the FP16 - 2-bit gap on tiny-s (its 2-bit failures are mostly arithmetic),
    60% elsewhere. Where a target lies above every ceiling that fits the same cost, the goal says so."""
    goals = []
    fp16, naive, learned, rule = (methods.get(m) for m in ("fp16", "2bit", "learned", "rule"))
    if not (fp16 and naive):
        return goals
    gap = fp16["accuracy"] - naive["accuracy"]
    cost = lambda s: s["weight_bytes_read"] / fp16["weight_bytes_read"] if fp16.get("weight_bytes_read") else None  # noqa: E731
    target = 0.4 if model == "tiny-s" else 0.6
    if learned and gap > 0:
        recovered = (learned["accuracy"] - naive["accuracy"]) / gap
        needed = naive["accuracy"] + target * gap
        goal = {"goal": f"learned rescue recovers at least {target:.0%} of the FP16 - 2-bit gap",
                "value": f"{recovered:.0%} of the gap ({learned['accuracy']:.1%}; needs {needed:.1%})",
                "met": recovered >= target}
        cheap = [c for c in ceilings if c["ceiling"] != "fp16" and (c.get("memory_bound_x_fp16") or 9) <= 0.4]
        if not goal["met"] and cheap and all(c["accuracy"] < needed for c in cheap):
            goal["value"] += ("; above every ceiling within 0.4x FP16 cost: "
                              + ", ".join(f"{c['ceiling']} {c['accuracy']:.1%}" for c in cheap))
        goals.append(goal)
    if learned and rule:
        separated = learned["accuracy_ci95"][0] > rule["accuracy_ci95"][1]
        margin = learned["accuracy"] - rule["accuracy"]
        # A step check is one FP16 forward pass: it counts as an FP16 token here.
        spent = {name: s["mean_tokens_fp16"] + s.get("mean_checks_fp16", 0.0) for name, s in
                 (("learned", learned), ("rule", rule))}
        checks = f" (incl. {learned['mean_checks_fp16']:.0f} checks)" if learned.get("mean_checks_fp16") else ""
        goals.append({"goal": "learned beats the rule by at least 10 points, 95% intervals apart, "
                              "with no more FP16 tokens",
                      "value": f"{margin * 100:+.1f} points ({learned['accuracy']:.1%} vs {rule['accuracy']:.1%}; "
                               f"intervals {'apart' if separated else 'overlap'}); FP16 tokens "
                               f"{spent['learned']:.0f}{checks} vs {spent['rule']:.0f}",
                      "met": margin >= 0.10 and separated and spent["learned"] <= spent["rule"]})
    if learned and cost(learned) is not None:
        goals.append({"goal": "learned at no more than 0.4x FP16's memory-bound cost",
                      "value": f"{cost(learned):.2f}x", "met": cost(learned) <= 0.4})
    curve = [s for m, s in methods.items() if m == "learned" or m.startswith("learned@")]
    if curve and rule and cost(rule) is not None:
        affordable = [s for s in curve if cost(s) <= cost(rule) + 1e-9]
        best = max(affordable, key=lambda s: s["accuracy"]) if affordable else None
        goals.append({"goal": "at the rule's FP16 cost, the learned curve is more accurate than the rule",
                      "value": (f"best learned point within {cost(rule):.2f}x: {best['accuracy']:.1%} "
                                f"vs rule {rule['accuracy']:.1%}") if best else
                               f"no learned point within the rule's {cost(rule):.2f}x",
                      "met": bool(best) and best["accuracy"] > rule["accuracy"]})
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
    policy = (summary["detector"].get("calibration") or {}).get("policy") or {}
    if policy.get("budgets"):
        lines += ["", "## Learned action policy (chosen on the validation traces; modeled, not run)", "",
                  f"Fallback modeled to succeed {policy['fallback_success']:.0%} of the time and to cost "
                  f"max({policy['reference_length']:.0f} - alarm, {policy['reference_length'] / 4:.0f}) FP16 tokens "
                  "(`detector/policy.py`)."
                  + (f" Steps the step head flags: FP16 {'checks them' if policy.get('step_action') == 'check' else 'rewrites them'}"
                     " (step threshold; steps per trace)." if policy.get("step_rewrites") else ""), "",
                  "| FP16 budget | ends_wrong threshold | commit threshold | step threshold | steps to FP16 "
                  "| modeled accuracy | modeled FP16 share | committed | fell back |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {b['fp16_budget']:g} | {b['wrong_threshold']:.3f} | {b['commit_threshold']:.3f} "
                  f"| {b.get('step_threshold', 2.0):.3f} | {b.get('step_rewrites', 0.0):.1f} "
                  f"| {b['modeled_accuracy']:.1%} | {b['modeled_fp16_share']:.1%} | {b['committed']:.1%} "
                  f"| {b['fell_back']:.1%} |" for b in policy["budgets"]]
    elif policy.get("skipped"):
        lines += ["", f"Learned action policy: none ({policy['skipped']}); the learned trigger commits to the "
                  "earliest candidate."]
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
