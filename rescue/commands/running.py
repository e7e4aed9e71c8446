"""`rescue run`, the main job: quantize, collect, label, train, compare; one report with the goals."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from inference.config import RescueConfig
from inference.errors import RescueError
from rescue.commands.collecting import collect
from rescue.commands.common import _quantized_matches
from rescue.commands.comparing import compare, run_methods
from rescue.commands.labeling import label
from rescue.commands.quantizing import quantize


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
    # The paper's rule, and the rule tuned for an FP16 budget on the same validation traces where it ran.
    rules = [("rule", rule)] + [(m, s) for m, s in methods.items() if m.startswith("rule@")]
    for name, compared in rules:
        if not (learned and compared):
            continue
        separated = learned["accuracy_ci95"][0] > compared["accuracy_ci95"][1]
        margin = learned["accuracy"] - compared["accuracy"]
        # A step check is one FP16 forward pass: it counts as an FP16 token here.
        spent = {who: s["mean_tokens_fp16"] + s.get("mean_checks_fp16", 0.0) for who, s in
                 (("learned", learned), ("rule", compared))}
        checks = f" (incl. {learned['mean_checks_fp16']:.0f} checks)" if learned.get("mean_checks_fp16") else ""
        label = "the rule" if name == "rule" else f"the rule tuned for FP16 budget {name.split('@', 1)[1]} ({name})"
        goals.append({"goal": f"learned beats {label} by at least 10 points, 95% intervals apart, "
                              "with no more FP16 tokens",
                      "value": f"{margin * 100:+.1f} points ({learned['accuracy']:.1%} vs {compared['accuracy']:.1%}; "
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


# The regime criterion of MODEL_CARD.md: at least this share of 2-bit traces loop or fail to commit.
PROCESS_FAILURE_SHARE = 0.15


def _failure_kinds(summary: dict) -> list[str]:
    """What 2-bit breaks in this run's model, from its train traces' labels, and where to see the rest."""
    rates = (summary["labels"].get("train") or {}).get("rates") or {}
    process = rates.get("loop_or_fails_to_commit")
    if process is None:
        return []
    arithmetic = rates.get("wrong_step")
    lines = ["", "## What 2-bit breaks in this model (its train traces)", "",
             f"Loop or fail to commit (the paper's process failures): {process:.1%}"
             + (f"; contain a wrong arithmetic step: {arithmetic:.1%}" if arithmetic is not None else "")
             + f"; end correct: {rates.get('correct', 0.0):.1%}.", ""]
    if process >= PROCESS_FAILURE_SHARE:
        lines.append(f"At least {PROCESS_FAILURE_SHARE:.0%} of the 2-bit traces loop or fail to commit: this twin "
                     "shows the paper's phenomenon, and the loop and commitment heads have failures to act on"
                     + (f"; more of its traces still hold a wrong arithmetic step ({arithmetic:.1%}), which the "
                        "step checks act on" if arithmetic is not None and arithmetic > process else "") + ".")
    else:
        lines.append(f"Fewer than {PROCESS_FAILURE_SHARE:.0%} of these 2-bit traces loop or fail to commit, so on "
                     "them this twin's failures are mostly not the paper's (loops, no commitment)"
                     + (": they are wrong arithmetic steps, which the step checks act on" if arithmetic else "")
                     + "." + ("" if summary.get("model") == "tiny-m" else
                              " The embedded family's twin that shows the paper's phenomenon is tiny-m's, shipped "
                              "with its model (`rescue run --config tiny-m`; MODEL_CARD.md: one trained model and "
                              "one GPTQ draw)."))
    return lines


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
    lines += _failure_kinds(summary)
    policy = (summary["detector"].get("calibration") or {}).get("policy") or {}
    if policy.get("budgets"):
        lines += ["", "## Learned action policy (chosen on the validation traces; modeled, not run)", "",
                  f"Fallback modeled to succeed {policy['fallback_success']:.0%} of the time (after a wrong step "
                  "left to 2-bit: as the trace ended) and to cost "
                  f"max({policy['reference_length']:.0f} - alarm, {policy['reference_length'] / 4:.0f}) FP16 tokens "
                  "(`detector/policy.py`)."
                  + (" Steps the step head flags: FP16 "
                     + ("checks them" if policy.get("step_action") == "check" else "rewrites them")
                     + " (step threshold; steps per trace)." if policy.get("step_rewrites") else ""), "",
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
