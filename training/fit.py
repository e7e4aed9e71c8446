"""`rescue train`: fit the detector on labeled trace sets, calibrate its thresholds, write the artifact.

Steps: `TraceDataModule` (checks, split by problem, normalisation statistics, class counts) ->
Lightning fit of `ProbeModule` (early stopping on the validation AUPRC of `loop_within_h`, the best
epoch's weights kept) -> scores on the validation traces -> per-head thresholds for the target
false-alarm rate (`detector.calibration`) -> `detector.artifact.save_detector`. Tracking goes through
Lightning's WandbLogger (offline by default, none when `wandb.mode` is disabled): losses, AUROC/AUPRC
per epoch, PR curves, the card as config, and the artifact folder.

`detect_report` is the offline comparison: held-out traces replayed with the
learned trigger and two rules (the repeated-n-gram loop check and the confidence rule: top-token
probability at or above a threshold for W consecutive tokens), all set for the same false-alarm rate
on validation.
"""

from __future__ import annotations

import bisect
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from inference.config import RescueConfig
from inference.errors import RescueError

from detector.calibration import NEVER  # noqa: E402  (an untrained head's threshold: it never alarms or plans)


def _wandb_logger(config: RescueConfig, run_dir: Path):
    """W&B through Lightning's WandbLogger (offline by default); False when W&B is disabled."""
    if config.wandb.mode == "disabled":
        return False
    from lightning.pytorch.loggers import WandbLogger

    from inference.tracking import stage_config, start_run

    run = start_run(config.wandb.mode, config.wandb.project, f"{config.model.name}-train", "train",
                    stage_config(config, "train"), run_dir)
    return WandbLogger(experiment=run)


def base_model_parameters(config: RescueConfig) -> int | None:
    """Parameters of the configured full-precision model, counted on the meta device from its
    config.json (no weights read); None where the model is not at hand."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        from inference.decoding.models import resolve_model_source

        model_config = AutoConfig.from_pretrained(resolve_model_source(config.model.fp16, "model"))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # an estimate for the card; its absence must not stop training
        return None


@torch.no_grad()
def score_traces(probe, examples) -> list[dict[str, Any]]:
    """Per trace: positions, probabilities [captured, 2], targets and labels (for metrics and calibration)."""
    probe.eval()
    scored = []
    for example in examples:
        scored.append({"positions": example.positions.numpy(), "scores": probe(example.features).sigmoid().numpy(),
                       "targets": example.targets.numpy(), "labels": example.labels, "healthy": example.healthy,
                       "generated_ids": example.generated_ids.tolist(),
                       "top_prob": None if example.top_prob is None else example.top_prob.numpy()})
    return scored


def position_metrics(scored: list[dict[str, Any]], budget: int | None) -> dict[str, float]:
    """AUROC and AUPRC per head over all validation positions; for `fails_to_commit` also from the
    positions within the first quarter of the budget alone (how early non-commitment shows)."""
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    from detector.probe import HEADS

    scores = torch.from_numpy(np.concatenate([s["scores"] for s in scored]))
    raw_targets = torch.from_numpy(np.concatenate([s["targets"] for s in scored]))
    targets = raw_targets.nan_to_num(0.0).long()
    positions = np.concatenate([s["positions"] for s in scored])
    metrics = {}
    for index, head in enumerate(HEADS[: scores.shape[1]]):
        defined = ~raw_targets[:, index].isnan()  # answer_correct has targets at candidate positions only
        head_scores, head_targets = scores[defined, index], targets[defined, index]
        if not 0 < int(head_targets.sum()) < len(head_targets):
            continue  # one class only: AUROC/AUPRC are undefined (an untrained head), so none is reported
        metrics[f"{head}/auroc"] = float(binary_auroc(head_scores, head_targets))
        metrics[f"{head}/auprc"] = float(binary_average_precision(head_scores, head_targets))
    if budget:
        early = torch.from_numpy(positions < budget / 4)
        early_targets = targets[early, 1]
        if 0 < int(early_targets.sum()) < len(early_targets):
            metrics["fails_to_commit/auroc_first_quarter"] = float(binary_auroc(scores[early, 1], early_targets))
    return metrics


def calibrate(scored: list[dict[str, Any]], stride: int, patience: int, target: float,
              plan_positions: int = 1, untrained: dict[str, str] | None = None) -> dict[str, Any]:
    """Per-head thresholds on the stride-grid scores of the validation traces, loop lead times, and the
    planning threshold on the early `fails_to_commit` risk (positions < `plan_positions`). An untrained
    head (`untrained`: head -> reason) gets a threshold above any probability: it never alarms."""
    from detector.calibration import calibrate_head, choose_plan_threshold, first_alarm
    from detector.probe import ALARM_HEADS, HEADS

    grids = [s["positions"] % stride == 0 for s in scored]
    healthy = {"loop_within_h": [s["healthy"] for s in scored], "fails_to_commit": [s["healthy"] for s in scored],
               # a wrong-answer alarm is false on a trace that ends correct
               "ends_wrong": [s["labels"].correct for s in scored]}
    positive = {"loop_within_h": [s["labels"].loop_onset is not None for s in scored],
                "fails_to_commit": [s["labels"].fails_to_commit for s in scored],
                "ends_wrong": [not s["labels"].correct for s in scored]}
    heads = {}
    for index, head in enumerate(HEADS):
        if head not in ALARM_HEADS:
            role = ("ranks candidate answers" if head == "answer_correct"
                    else "judges each arithmetic step as it is closed")
            heads[head] = {"head": head, "threshold": NEVER, "patience": patience,
                           "note": f"{role} (calibration.policy); never alarms"}
            continue
        sequences = [s["scores"][grid, index] for s, grid in zip(scored, grids)]
        if head == "ends_wrong" and not any(healthy[head]):
            heads[head] = {"head": head, "threshold": NEVER, "patience": patience,
                           "note": "no validation trace ends correct: no false-alarm rate to set"}
            continue
        try:
            heads[head] = calibrate_head(head, sequences, healthy[head], positive[head], patience, target).to_dict()
        except ValueError as error:
            raise RescueError(f"calibration: {error}") from None
        if head in (untrained or {}):
            heads[head].update(threshold=NEVER, false_alarm_rate=0.0, detection_rate=None,
                               untrained=untrained[head])
    leads = []
    threshold = heads["loop_within_h"]["threshold"]
    for s, grid in zip(scored, grids):
        onset = s["labels"].loop_onset
        if onset is None:
            continue
        alarm = first_alarm(s["scores"][grid, 0], threshold, patience)
        if alarm is not None:
            leads.append(int(s["positions"][grid][alarm]) - onset)
    risks = [float(s["scores"][s["positions"] < plan_positions, 1].max(initial=0.0)) for s in scored]
    failing = [s["labels"].fails_to_commit or s["labels"].loop_onset is not None for s in scored]
    plan = {**choose_plan_threshold(risks, failing, target), "positions": plan_positions,
            "risk": "highest fails_to_commit score at generated positions < positions; failing = loop or no commit"}
    if "fails_to_commit" in (untrained or {}):
        # The untrained head's scores mean nothing: it never plans, as it never alarms.
        plan.update(threshold=NEVER, planned_failing=0.0 if plan["failing_traces"] else None,
                    planned_healthy=0.0 if plan["healthy_traces"] else None,
                    untrained=untrained["fails_to_commit"])
    return {"stride": stride, "patience": patience, "target_false_alarm_rate": target, "heads": heads, "plan": plan,
            "loop_alarm_minus_onset_tokens": {
                "count": len(leads), "median": float(np.median(leads)) if leads else None,
                "note": "first alarm position minus labeled loop onset, caught loops only; negative = before onset"}}


def calibrate_policy(scored: list[dict[str, Any]], calibration: dict[str, Any], fallback_success: float,
                     untrained: dict[str, str] | None = None, step_action: str = "check") -> dict[str, Any] | None:
    """The learned action policy per FP16 budget (`detector.policy.choose_policy`) on the stride-grid
    scores of the validation traces; None (the trigger keeps the old commit-the-earliest policy) when a
    decision head is untrained, with the reason in the card instead."""
    from detector.policy import PolicyTrace, candidate_scores, choose_policy, step_scores
    from detector.probe import DECISION_HEADS, HEADS

    missing = [head for head in DECISION_HEADS if head in (untrained or {})]
    if missing:
        return {"skipped": f"decision head {missing[0]} is untrained: {untrained[missing[0]]}"}
    stride = calibration["stride"]
    loop, wrong, candidate = (HEADS.index(h) for h in ("loop_within_h", "ends_wrong", "answer_correct"))
    # The step head joins the policy when it was trained and scored (a detector of an older trace set, or
    # of text without arithmetic steps, has none to use).
    step = HEADS.index("step_wrong")
    use_steps = all(s["scores"].shape[1] > step for s in scored) and "step_wrong" not in (untrained or {})
    traces = []
    for s in scored:
        grid = s["positions"] % stride == 0
        positions = s["positions"][grid]
        traces.append(PolicyTrace(
            positions=positions, loop=s["scores"][grid, loop], wrong=s["scores"][grid, wrong],
            candidates=candidate_scores(positions, s["scores"][grid, candidate], s["labels"].candidates),
            length=s["labels"].length, correct=s["labels"].correct,
            wrong_steps=[int(token) for token, wrong, _ in s["labels"].steps if wrong],
            steps=step_scores(s["positions"], s["scores"][:, step], s["labels"].steps) if use_steps else []))
    return choose_policy(traces, calibration["heads"]["loop_within_h"]["threshold"], calibration["patience"],
                         fallback_success, use_steps=use_steps, step_action=step_action)


def plot_pr_curves(scored: list[dict[str, Any]], path: Path) -> Path:
    """Precision-recall curves of every head over the validation positions (where it has targets), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchmetrics.functional.classification import binary_average_precision, binary_precision_recall_curve

    from detector.probe import HEADS

    all_scores = torch.from_numpy(np.concatenate([s["scores"] for s in scored]))
    raw_targets = torch.from_numpy(np.concatenate([s["targets"] for s in scored]))
    heads = HEADS[: all_scores.shape[1]]  # a two-head detector's scores: its heads come first in HEADS
    figure, axes = plt.subplots(1, len(heads), figsize=(5 * len(heads), 4))
    for index, head in enumerate(heads):
        defined = ~raw_targets[:, index].isnan()
        scores, targets = all_scores[defined, index], raw_targets[defined, index].long()
        if not 0 < int(targets.sum()) < len(targets):
            axes[index].set_title(f"{head}: one class only")
            continue
        precision, recall, _ = binary_precision_recall_curve(scores, targets)
        auprc = float(binary_average_precision(scores, targets))
        base = float(targets.float().mean())
        axes[index].plot(recall.numpy(), precision.numpy(), label=f"probe (AUPRC {auprc:.3f})")
        axes[index].axhline(base, color="grey", linestyle="--", label=f"chance ({base:.3f})")
        axes[index].set_xlabel("recall")
        axes[index].set_ylabel("precision")
        axes[index].set_title(f"{head} (validation positions)")
        axes[index].set_xlim(0, 1)
        axes[index].set_ylim(0, 1.02)
        axes[index].legend(loc="lower left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def train_detector(config: RescueConfig, traces: str, val: str | None = None, out: str | None = None,
                   progress: bool = True) -> dict:
    """Fit, calibrate and save the detector of the config's model on a labeled trace set.

    `traces`: training trace set (with labels.json); `val`: separate validation trace set (default:
    hold out `detector.val_fraction` of the training problems); `out`: artifact folder (default
    `<output_dir>/<model.name>/detector`). Returns the summary (also in the card's `metrics`).
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar

    from detector.artifact import save_detector
    from detector.probe import HEADS, ProbeModule, flops_comparison
    from training.datamodule import TraceDataModule

    spec = config.detector
    began = time.perf_counter()
    L.seed_everything(spec.seed, verbose=False)
    data = TraceDataModule(config, traces, val)
    data.setup()
    out_dir = Path(out or Path(config.output_dir) / config.model.name / "detector")
    run_dir = Path(config.output_dir) / config.model.name / "train"
    module = ProbeModule(data.recipe.feature_dim, spec.hidden_width, spec.hidden_layers, spec.dropout,
                         spec.learning_rate, spec.weight_decay, pos_weight=data.pos_weight,
                         untrained=tuple(data.untrained_heads))
    for head, reason in data.untrained_heads.items():
        print(f"warning: {head} is left untrained (its alarm is disabled): {reason}")
    counts = data.counts
    if progress:
        print(f"training the {config.model.name} detector: {counts['train']['traces']} train / "
              f"{counts['val']['traces']} val traces, {counts['train']['positions']} / {counts['val']['positions']} "
              f"positions, {data.recipe.feature_dim} features, pos_weight "
              + ", ".join(f"{w:.1f}" for w in data.pos_weight))
    logger = _wandb_logger(config, run_dir)
    monitor = f"val/{next(h for h in HEADS if h not in data.untrained_heads)}/auprc"
    with tempfile.TemporaryDirectory(prefix="detector-checkpoints-") as checkpoints:
        best = ModelCheckpoint(dirpath=checkpoints, monitor=monitor, mode="max", save_top_k=1, filename="best")
        callbacks = [EarlyStopping(monitor=monitor, mode="max", patience=spec.early_stopping_patience), best]
        if progress:
            callbacks.append(TQDMProgressBar(refresh_rate=10))
        trainer = L.Trainer(
            max_epochs=spec.max_epochs, accelerator="auto", devices=1, logger=logger, callbacks=callbacks,
            enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
            log_every_n_steps=10, default_root_dir=run_dir,
        )
        fit_began = time.perf_counter()
        trainer.fit(module, data)
        fit_seconds = time.perf_counter() - fit_began
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    probe = module.probe.cpu().eval()

    model = data.identity.get("model", {})
    base_model = {key: model.get(key) for key in ("name", "fp16", "quantized", "precision", "hidden_size")}
    base_model["tokenizer_hash"] = data.identity.get("tokenizer_hash")
    scored = score_traces(probe, data.traces("val"))
    metrics = position_metrics(scored, data.identity.get("sampling", {}).get("budget"))
    calibration = calibrate(scored, data.capture_stride, spec.patience, spec.target_false_alarm_rate,
                            config.rescue.plan_probe_tokens, data.untrained_heads)
    calibration["policy"] = calibrate_policy(scored, calibration, spec.fallback_success, data.untrained_heads,
                                           spec.step_action)
    control = config.rescue
    budget_limit = (int(config.sampling.budget * control.rule_budget_fraction)
                    if control.rule_budget_fraction < 1.0 else None)
    calibration["rules"] = {"for_budget": tune_rule_for_budgets(scored, control.rule_ngram, budget_limit,
                                                                control.plan_tokens, spec.fallback_success),
                            "ngram": tune_ngram_rule(scored, spec.rule_ngram, spec.rule_window,
                                                     spec.target_false_alarm_rate),
                            "confidence": tune_confidence_rule(scored, spec.rule_confidence_window,
                                                               spec.target_false_alarm_rate)}
    flops = flops_comparison(probe, data.recipe.mean_window, base_model_parameters(config))
    plot = plot_pr_curves(scored, run_dir / "pr-curves.png")
    summary = {
        "model": config.model.name,
        "artifact": str(out_dir),
        "train_traces": counts["train"]["traces"], "val_traces": counts["val"]["traces"],
        "train_positions": counts["train"]["positions"], "val_positions": counts["val"]["positions"],
        "epochs": trainer.current_epoch, "best_epoch_score": float(best.best_model_score or float("nan")),
        "fit_seconds": round(fit_seconds, 1), "total_seconds": round(time.perf_counter() - began, 1),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "val": metrics,
        "calibration": calibration,
        "flops": flops,
    }
    card = {
        "base_model": base_model,
        "horizon": config.labels.horizon,
        "label_params": data.label_params,
        "probe": {**flops, "dropout": spec.dropout},
        "calibration": calibration,
        "training_data": data.sources,
        "training": {"counts": counts, "pos_weight": data.pos_weight, "config": config.to_dict()["detector"],
                     "epochs": trainer.current_epoch, "fit_seconds": summary["fit_seconds"],
                     "device": summary["device"]},
        "metrics": {"val": metrics},
    }
    save_detector(out_dir, probe, data.recipe, data.stats, card)
    summary["total_seconds"] = round(time.perf_counter() - began, 1)
    if logger:
        _log_to_wandb(logger, summary, plot, out_dir, config.model.name, trace_sets=[traces, val])
    if progress:
        print(format_summary(summary))
    return summary


def _log_to_wandb(logger, summary: dict, plot: Path, out_dir: Path, model_name: str, trace_sets=()) -> None:
    from inference.tracking import detector_artifact, labels_artifact, use_artifacts

    def flatten(tree: dict, prefix: str = "") -> dict:
        flat = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f"{prefix}{key}/"))
            elif isinstance(value, (int, float, str)) or value is None:
                flat[f"{prefix}{key}"] = value
        return flat

    logger.experiment.summary.update(flatten(summary))
    logger.log_image("val/pr_curves", images=[str(plot)])
    use_artifacts(logger.experiment, [labels_artifact(path, model_name) for path in trace_sets if path])
    logger.experiment.log_artifact(detector_artifact(out_dir, model_name, json.loads((out_dir / "card.json").read_text())))
    logger.experiment.finish()


def format_summary(summary: dict) -> str:
    heads = summary["calibration"]["heads"]
    parts = [f"detector {summary['artifact']}: {summary['epochs']} epochs in {summary['fit_seconds']:.1f} s "
             f"({summary['device']})"]
    for head, entry in heads.items():
        if "untrained" in entry:
            parts.append(f"{head}: untrained, alarm disabled ({entry['untrained']})")
            continue
        if "note" in entry:
            auroc = summary["val"].get(f"{head}/auroc")
            parts.append(f"{head}: {'AUROC ' + format(auroc, '.3f') + ', ' if auroc is not None else ''}{entry['note']}")
            continue
        detection = "n/a" if entry["detection_rate"] is None else f"{entry['detection_rate']:.1%}"
        parts.append(f"{head}: AUROC {summary['val'][f'{head}/auroc']:.3f} AUPRC {summary['val'][f'{head}/auprc']:.3f}, "
                     f"threshold {entry['threshold']:.3f} x{entry['patience']} steps -> false alarms "
                     f"{entry['false_alarm_rate']:.1%} of {entry['healthy_traces']} healthy traces, caught "
                     f"{detection} of {entry['positive_traces']}")
    policy = summary["calibration"].get("policy") or {}
    if policy.get("budgets"):
        parts.append("action policy (modeled on validation traces): " + ", ".join(
            f"FP16 budget {b['fp16_budget']:g} -> {b['modeled_accuracy']:.1%}" for b in policy["budgets"]
            if b["fp16_budget"] in (0.0, 0.1, 0.2, 0.4, 1.0)))
    elif policy.get("skipped"):
        parts.append(f"action policy: none ({policy['skipped']})")
    rules = summary["calibration"].get("rules", {})
    if "ngram" in rules:
        rule = rules["ngram"]
        parts.append(f"n-gram rule: {rule['ngram']}-gram {rule['min_repeats']}x within {rule['window']} tokens -> "
                     f"false alarms {rule['false_alarm_rate']:.1%}, caught {_percent(rule['detection_rate'])} of loops")
    if "confidence" in rules:
        rule = rules["confidence"]
        if "skipped" in rule:
            parts.append(f"confidence rule: skipped ({rule['skipped']})")
        else:
            parts.append(f"confidence rule: top-token probability >= {rule['threshold']:.6g} for {rule['window']} "
                         f"tokens -> false alarms {rule['false_alarm_rate']:.1%}, caught "
                         f"{_percent(rule['detection_rate'])} of loops")
    return "\n".join(parts)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


# -- offline comparison with the rule ---------------------------------------------------------------


def ngram_repeats(ids: Sequence[int], n: int, window: int) -> np.ndarray:
    """The repeated-n-gram rule's reading per generated position t: how many times the n-gram ending
    at t occurs within the last `window` tokens (t included; 0 before the first n tokens)."""
    counts = np.zeros(len(ids), dtype=np.int64)
    ends: dict[tuple[int, ...], list[int]] = {}
    for t in range(n - 1, len(ids)):
        seen = ends.setdefault(tuple(ids[t - n + 1 : t + 1]), [])
        seen.append(t)
        counts[t] = len(seen) - bisect.bisect_left(seen, t - window + n)
    return counts


def tune_ngram_rule(scored: list[dict[str, Any]], n: int, window: int, target: float) -> dict[str, Any]:
    """The smallest repeat count (>= 2) at which the n-gram rule alarms on at most `target` of the
    healthy validation traces; the rule is checked at every token, as the rule trigger does."""
    from detector.calibration import choose_threshold

    peaks = np.array([ngram_repeats(s["generated_ids"], n, window).max(initial=0) for s in scored])
    healthy = np.array([s["healthy"] for s in scored])
    loops = np.array([s["labels"].loop_onset is not None for s in scored])
    repeats = max(2, math.ceil(choose_threshold(peaks[healthy], target)))
    return {"ngram": n, "window": window, "min_repeats": repeats, "target_false_alarm_rate": target,
            "false_alarm_rate": float((peaks[healthy] >= repeats).mean()),
            "detection_rate": float((peaks[loops] >= repeats).mean()) if loops.any() else None}


RULE_COUNTS = (2, 3, 4, 6, 8)
RULE_WINDOWS = (128, 256, 512)


def tune_rule_for_budgets(scored: list[dict[str, Any]], ngram: int, budget_limit: int | None, plan_tokens: int,
                          fallback_success: float, budgets: Sequence[float] | None = None) -> dict[str, Any]:
    """The rule's parameters per FP16 budget, chosen on the validation traces with the learned policy's model
    (`detector.policy`), so that the rule and the learned trigger are tuned for the same budget on the same
    traces. Tuned: the loop check's repeat count (`RULE_COUNTS`) and window (`RULE_WINDOWS`; the n-gram
    length is the config's), whether FP16 plans, and what an alarm does (`auto`: commit to the earliest
    candidate stated before it, else fall back; `fallback`: always fall back; `commit`: always close the
    thinking, a trace with no candidate then modeled wrong). The budget check
    (`budget_limit`, the position at which it fires) is kept.

    The model of one trace: its first alarm is the first position where the n-gram occurs `count` times
    within `window` tokens, or the budget check where the trace ran that long without closing its
    thinking; no alarm keeps the trace's outcome; a commit is graded; a fallback succeeds with
    `fallback_success` at `max(reference - alarm, reference / 4)` FP16 tokens, except after a wrong step
    written before the alarm (the rule repairs no step), where it ends as the trace did. A plan costs `plan_tokens`
    FP16 tokens (the configured most) and is modeled to change nothing: validation traces hold no plans,
    and `plan-only` measures within noise of naive 2-bit on the embedded family. The rule watches the
    thinking only; the model reads the whole trace (a few answer tokens follow `</think>`)."""
    from detector.policy import BUDGETS, best_within_budgets, reference_length

    budgets = BUDGETS if budgets is None else budgets
    if not scored:
        raise ValueError("no validation traces to tune the rule on")
    labels = [s["labels"] for s in scored]
    reference = reference_length(labels)
    outcomes = []
    for window in (w for w in RULE_WINDOWS if w >= ngram):
        repeats = [ngram_repeats(s["generated_ids"], ngram, window) for s in scored]
        for count in RULE_COUNTS:
            alarms = []
            for label, reading in zip(labels, repeats):
                hits = np.flatnonzero(reading >= count)
                alarm = int(hits[0]) if len(hits) else None
                if (budget_limit is not None and label.length > budget_limit
                        and (label.unclosed_think or label.budget_exhausted)):
                    alarm = budget_limit - 1 if alarm is None else min(alarm, budget_limit - 1)
                alarms.append(alarm)
            for on_alarm in ("auto", "fallback", "commit"):
                correct = fp16 = total = 0.0
                for label, alarm in zip(labels, alarms):
                    if alarm is None:
                        correct, total = correct + label.correct, total + label.length
                        continue
                    earlier = [c for c in label.candidates if c[0] < alarm]
                    if on_alarm in ("auto", "commit") and earlier:
                        correct, total = correct + earlier[0][1], total + alarm + 1
                    elif on_alarm == "commit":
                        total += alarm + 1  # the thinking closed with no answer stated: modeled wrong
                    else:
                        spent = max(reference - alarm, reference / 4)
                        inherited = any(wrong and token < alarm for token, wrong, _ in label.steps)
                        success = label.correct if inherited else fallback_success
                        correct, fp16, total = correct + success, fp16 + spent, total + alarm + spent
                for plan in ((False, True) if plan_tokens > 0 else (False,)):
                    planned = plan_tokens * len(labels) if plan else 0.0
                    outcomes.append({"count": count, "window": window, "plan": plan, "on_alarm": on_alarm,
                                     "modeled_accuracy": correct / len(labels),
                                     "modeled_fp16_share": (fp16 + planned) / (total + planned) if total else 0.0,
                                     "alarmed": sum(a is not None for a in alarms) / len(labels)})
    choices = [{"fp16_budget": budget, **best} for budget, best in
               best_within_budgets(outcomes, budgets, len(scored), lambda o: o["modeled_fp16_share"],
                                   lambda o: o["modeled_accuracy"], lambda o: (o["count"], o["window"]))]
    return {"ngram": ngram, "budget_limit": budget_limit, "plan_tokens": plan_tokens,
            "reference_length": reference, "fallback_success": fallback_success, "traces": len(scored),
            "budgets": choices}


def tune_confidence_rule(scored: list[dict[str, Any]], window: int, target: float) -> dict[str, Any]:
    """The lowest threshold t at which the confidence rule (the top-token probability >= t for `window`
    consecutive generated tokens, checked at every token) alarms on at most `target` of the healthy
    validation traces. A trace alarms at t iff its sustained peak (max over `window`-token windows of
    the window's smallest probability) is >= t, as for the probe's heads (`detector.calibration`).
    Returns the reason under "skipped" where the validation traces store no top-token probabilities."""
    from detector.calibration import choose_threshold, sustained_peak

    rule: dict[str, Any] = {"window": window, "target_false_alarm_rate": target}
    if any(s.get("top_prob") is None for s in scored):
        return {**rule, "skipped": "the validation traces store no top-token probabilities (trace-set schema 1); "
                                   "recollect them with `rescue collect` to tune the confidence rule"}
    peaks = np.array([sustained_peak(s["top_prob"], window) for s in scored])
    healthy = np.array([s["healthy"] for s in scored])
    loops = np.array([s["labels"].loop_onset is not None for s in scored])
    # Probabilities are >= 0, so a threshold below 0 (all but `target` of the healthy traces shorter
    # than the window) alarms exactly as 0 does.
    threshold = max(0.0, choose_threshold(peaks[healthy], target))
    return {**rule, "threshold": threshold, "false_alarm_rate": float((peaks[healthy] >= threshold).mean()),
            "detection_rate": float((peaks[loops] >= threshold).mean()) if loops.any() else None}


def confidence_alarm(top_prob: np.ndarray, threshold: float, window: int) -> int | None:
    """The generated position at which the confidence rule alarms: the `window`-th consecutive token
    whose top-token probability is >= `threshold` (None if it never does)."""
    from detector.calibration import first_alarm

    return first_alarm(np.asarray(top_prob, dtype=np.float64), threshold, window)


def confidence_rule_skipped(rule: dict[str, Any] | None, trace_set, test: str, detector: Path) -> str | None:
    """Why `detect_report` cannot replay the confidence rule (None when it can)."""
    if rule is None:
        return f"{detector}: the card holds no tuned confidence rule; retrain with `rescue train`"
    if "skipped" in rule:
        return f"not tuned when the detector was trained: {rule['skipped']}"
    if not trace_set.stores_top_prob:
        return (f"{test}: trace-set schema version {trace_set.manifest.schema_version} stores no top-token "
                "probabilities; recollect with `rescue collect`")
    return None


def trigger_outcomes(alarms: Sequence[int | None], labels: Sequence[Any]) -> dict[str, Any]:
    """Share of loops caught, false alarms per healthy trace, failures to commit caught, and lead times
    (first alarm minus labeled loop onset, in tokens; negative = before onset) of one trigger."""
    loops = [(a, t.loop_onset) for a, t in zip(alarms, labels) if t.loop_onset is not None]
    healthy = [a for a, t in zip(alarms, labels) if t.loop_onset is None and not t.fails_to_commit]
    failing = [a for a, t in zip(alarms, labels) if t.fails_to_commit]
    leads = [a - onset for a, onset in loops if a is not None]
    share = lambda values: float(np.mean([a is not None for a in values])) if values else None  # noqa: E731
    return {"loops": len(loops), "loops_caught": share([a for a, _ in loops]), "healthy": len(healthy),
            "false_alarm_rate": share(healthy), "fails_to_commit": len(failing), "fails_caught": share(failing),
            "median_lead_tokens": float(np.median(leads)) if leads else None, "lead_tokens": leads}


def detect_report(config: RescueConfig, test: str, detector: str | None = None, out: str | None = None) -> dict:
    """Replay held-out traces step by step with the learned trigger, the repeated-n-gram rule and the
    confidence rule (all set on validation traces for the same false-alarm rate; see the card's
    calibration) and compare them: loops caught, false alarms per healthy trace, lead times. Writes
    `report.md`, `comparison.json`, `lead-times.png` and `pr-curves.png` to `out` (default
    `<output_dir>/<model.name>/detect-report`).

    The confidence rule needs the traces' top-token probabilities (trace-set schema 2 on) and a card
    that tuned it; without them its row is left out and the report says why (`skipped_rules`).
    """
    from detector.artifact import load_detector
    from detector.calibration import first_alarm
    from detector.probe import HEADS
    from training.datamodule import _targets as position_head_targets
    from training.datamodule import load_labels, model_hidden_size
    from training.traces import TraceSet, TraceSetError

    folder = Path(detector or Path(config.output_dir) / config.model.name / "detector")
    loaded = load_detector(folder, model_name=config.model.name, hidden_size=model_hidden_size(config),
                           layers=config.probe.layers)
    calibration = loaded.card["calibration"]
    rule = calibration.get("rules", {}).get("ngram")
    if rule is None:
        raise RescueError(f"{folder}: the card holds no tuned n-gram rule; retrain with `rescue train`")
    trace_set = TraceSet(test)
    confidence = calibration.get("rules", {}).get("confidence")
    skipped = {}
    reason = confidence_rule_skipped(confidence, trace_set, test, folder)
    if reason is not None:
        skipped["confidence rule"] = reason
    model = trace_set.identity.get("model", {})
    if model.get("name") != config.model.name or list(trace_set.identity.get("layers", [])) != list(loaded.recipe.layers):
        raise TraceSetError(f"{test}: traces of {model.get('name')!r} (layers {trace_set.identity.get('layers')}) do "
                            f"not fit the detector of {config.model.name!r} (layers {list(loaded.recipe.layers)})")
    labels, _ = load_labels(test)
    stride, patience = int(calibration["stride"]), int(calibration["patience"])
    thresholds = loaded.thresholds
    scored, alarms = [], {"learned loop_within_h": [], "learned fails_to_commit": [], "learned (either head)": [],
                          "n-gram rule": []}
    if "confidence rule" not in skipped:
        alarms["confidence rule"] = []
    trace_labels = []
    for trace in trace_set:
        if trace.id not in labels:
            raise TraceSetError(f"{test}: labels.json has no labels for trace {trace.id!r}; rerun `rescue label {test}`")
        label = labels[trace.id]
        scores = loaded.score_trace(trace.hidden, trace.positions).numpy()
        positions = trace.positions.numpy()
        targets = position_head_targets(label, trace.positions, int(loaded.card.get("horizon", config.labels.horizon)))
        scored.append({"scores": scores, "positions": positions, "targets": targets[:, : scores.shape[1]].numpy()})
        grid = positions % stride == 0
        head_alarms = []
        for head in ("loop_within_h", "fails_to_commit"):  # the loop and non-commitment alarms replayed here
            step = first_alarm(scores[grid, HEADS.index(head)], thresholds[head], patience)
            head_alarms.append(None if step is None else int(positions[grid][step]))
            alarms[f"learned {head}"].append(head_alarms[-1])
        present = [a for a in head_alarms if a is not None]
        alarms["learned (either head)"].append(min(present) if present else None)
        fired = np.flatnonzero(ngram_repeats(trace.generated_ids, rule["ngram"], rule["window"]) >= rule["min_repeats"])
        alarms["n-gram rule"].append(int(fired[0]) if len(fired) else None)
        if "confidence rule" in alarms:
            alarms["confidence rule"].append(confidence_alarm(trace.top_prob.numpy(), confidence["threshold"],
                                                              int(confidence["window"])))
        trace_labels.append(label)
    if not trace_labels:
        raise TraceSetError(f"{test}: the trace set holds no traces")
    outcomes = {name: trigger_outcomes(values, trace_labels) for name, values in alarms.items()}
    out_dir = Path(out or Path(config.output_dir) / config.model.name / "detect-report")
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_pr_curves(scored, out_dir / "pr-curves.png")
    _plot_lead_times(outcomes, out_dir / "lead-times.png")
    metrics = position_metrics(scored, trace_set.identity.get("sampling", {}).get("budget"))
    table = ["| trigger | loops caught | false alarms / healthy trace | fails to commit caught | median lead (tokens) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    percent = lambda value: "-" if value is None else f"{value:.1%}"  # noqa: E731
    for name, row in outcomes.items():
        lead = "-" if row["median_lead_tokens"] is None else f"{row['median_lead_tokens']:+.0f}"
        table.append(f"| {name} | {percent(row['loops_caught'])} of {row['loops']} | "
                     f"{percent(row['false_alarm_rate'])} of {row['healthy']} | "
                     f"{percent(row['fails_caught'])} of {row['fails_to_commit']} | {lead} |")
    if "confidence rule" in skipped:
        confidence_text = f"confidence rule: not replayed ({skipped['confidence rule']})"
    else:
        confidence_text = (f"confidence rule: top-token probability >= {confidence['threshold']:.6g} for "
                           f"{confidence['window']} consecutive tokens, every token")
        if confidence["threshold"] > 1.0:
            confidence_text += " (never fires: too many healthy validation traces sit at probability 1)"
    report = [f"# Detector vs rules on {test}", "",
              f"Learned trigger: thresholds {', '.join(f'{h} {t:.3f}' for h, t in thresholds.items())}, patience "
              f"{patience} steps of {stride} tokens; n-gram rule: the newest {rule['ngram']}-gram {rule['min_repeats']}x "
              f"within {rule['window']} tokens, every token; {confidence_text}. All set on validation traces for "
              f"<= {calibration['target_false_alarm_rate']:.0%} false alarms per healthy trace.", "", *table, "",
              "Lead = first alarm minus labeled loop onset (negative: before onset), loops caught only.", "",
              "Position-level: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), ""]
    (out_dir / "report.md").write_text("\n".join(report))
    summary = {"test": str(test), "detector": str(folder), "traces": len(trace_labels), "triggers": outcomes,
               "skipped_rules": skipped, "position_metrics": metrics, "out": str(out_dir)}
    (out_dir / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    from inference.tracking import start_run

    run = start_run(config.wandb.mode, config.wandb.project, f"{config.model.name}-detect-report", "detect-report",
                    {"test": str(test), "detector_card": loaded.card, "skipped_rules": skipped}, out_dir)
    if run is not None:
        import wandb

        run.log({"comparison": wandb.Table(columns=["trigger", "loops_caught", "false_alarm_rate", "fails_caught",
                                                     "median_lead_tokens"],
                                            data=[[n, r["loops_caught"], r["false_alarm_rate"], r["fails_caught"],
                                                   r["median_lead_tokens"]] for n, r in outcomes.items()]),
                 **{png.stem: wandb.Image(str(png)) for png in sorted(out_dir.glob("*.png"))}})
        run.finish()
    return summary


def _plot_lead_times(outcomes: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    groups = {name: outcomes[name]["lead_tokens"] for name in ("learned loop_within_h", "n-gram rule",
                                                               "confidence rule") if name in outcomes}
    every = [v for values in groups.values() for v in values]
    if every:
        bins = np.histogram_bin_edges(every, bins=min(30, max(5, len(set(every)))))
        for name, values in groups.items():
            if values:
                axes.hist(values, bins=bins, alpha=0.6, label=f"{name} ({len(values)} caught)")
        axes.axvline(0, color="grey", linestyle="--")
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no loop caught", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("first alarm - loop onset (tokens; negative = before onset)")
    axes.set_ylabel("looping traces")
    axes.set_title("Lead time: learned trigger vs rules")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
