"""`rescue compare`: every method on the same problems, with the table, the plots and W&B."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from inference.config import RescueConfig
from inference.errors import RescueError
from rescue.commands.common import _load_for_precision, warn_mismatches


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
    from inference.evaluation.compare import (CONTROLLED, METHODS as ALL_METHODS, build_trigger, learned_budget,
                                              measure_costs, modeled_costs, plot_comparison, rule_budget,
                                              tuned_rule, weight_bytes, write_comparison)
    from inference.evaluation.evaluate import run_controlled, run_method, summarize, write_evaluation
    from inference.decoding.models import load_quantized
    from inference.storage import folder_written_atomically
    from inference.tracking import stage_config, start_run
    from training.benchmarks import load_benchmark

    from training.ceilings import CEILINGS, ceiling_rows, ceiling_trigger

    methods = tuple(methods or default_methods(config))
    for method in methods:
        if method in ALL_METHODS or method in CEILINGS:
            continue
        if not method.startswith(("learned@", "rule@")):
            raise RescueError(f"unknown method {method!r} (expected one of {', '.join(ALL_METHODS + CEILINGS)}, "
                              "or learned@B or rule@B with an FP16 budget B in [0, 1])")
        try:
            learned_budget(method, config)
            rule_budget(method)
        except ValueError as error:
            raise RescueError(str(error)) from None
    if limit is not None and limit < 1:
        raise RescueError(f"--limit must be a positive integer, got {limit}")
    _check_methods(config, methods)
    projection = None
    if costs_file is not None:
        from inference.evaluation.compare import load_projection
        from inference.decoding.shapes import QWEN3_SHAPES

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
        models["fp16"], tokenizer = _load_for_precision(config, "fp16")
    detector = folder = None
    if any(learned_budget(m, config) is not None or rule_budget(m) is not None for m in methods):
        from detector.artifact import load_detector

        folder = config.rescue.detector or str(Path(config.output_dir) / config.model.name / "detector")
        detector = load_detector(folder, config.model.name, models["2bit"].config.hidden_size, config.probe.layers)
        if not detector.has_decision_heads:
            policy = (detector.card["calibration"].get("policy") or {}).get("skipped", "a two-head detector")
            print(f"note: {folder} has no learned action policy ({policy}); the learned trigger commits to the "
                  "earliest candidate, and the budget curve (learned@B) is left out")
            methods = tuple(m for m in methods if not m.startswith("learned@"))
        if any(rule_budget(m) is not None for m in methods) and tuned_rule(detector, 1.0) is None:
            print(f"note: {folder} holds no rule tuned per FP16 budget (a detector trained before the tuning); "
                  "rule@B is left out")
            methods = tuple(m for m in methods if rule_budget(m) is None)
    triggers = {m: build_trigger(m, config, tokenizer, detector) for m in methods
                if m in CONTROLLED or learned_budget(m, config) is not None or rule_budget(m) is not None}
    controls = {m: config.rescue for m in triggers}
    for method in triggers:
        if rule_budget(method) is not None:
            controls[method] = dataclasses.replace(config.rescue,
                                                   on_alarm=tuned_rule(detector, rule_budget(method))["on_alarm"])
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
        from inference.decoding.models import resolve_model_source

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
    """What `rescue compare` runs by default: every method, the rule tuned for `rescue.fp16_budget`, the
    learned trigger at each of `rescue.curve_budgets`, and the oracle ceilings (the step oracle on generated arithmetic only)."""
    from inference.evaluation.compare import METHODS as ALL_METHODS
    from training.ceilings import CEILINGS

    curve = tuple(f"learned@{budget:g}" for budget in config.rescue.curve_budgets
                  if abs(budget - config.rescue.fp16_budget) > 1e-9)
    ceilings = tuple(c for c in CEILINGS if c != "ceiling-step" or config.benchmark.name.startswith("arith"))
    return ALL_METHODS + (f"rule@{config.rescue.fp16_budget:g}",) + curve + ceilings


RUN_LEAVES_OUT = ("plan-only", "rescue-only", "ceiling-loop")
"""Methods `rescue run` does not compare (with the tuned rule, `rule@B`), so that it fits 15 minutes on 2 cores."""


def run_methods(config: RescueConfig) -> tuple[str, ...]:
    """What `rescue run` compares: `default_methods` without `RUN_LEAVES_OUT`, and of the learned curve only
    its smallest budget (with `learned` at `rescue.fp16_budget` and the naive 2-bit point, three points)."""
    methods = [m for m in default_methods(config) if m not in RUN_LEAVES_OUT and not m.startswith("rule@")]
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
