"""Every method on the same problems with the same seeds, and what each costs.

Methods:
- `fp16`: the full-precision model alone; `2bit`: its 2-bit twin alone (naive);
- `rule`: the rule trigger (FP16 plan if `rescue.rule_plan`, n-gram loop check, budget check);
- `learned`: the learned trigger (a detector artifact): plans where the early risk says so, acts on its alarms;
- `plan-only`: an FP16 plan for every trace, no in-trace rescue;
- `rescue-only`: the rule's in-trace rescue (loop and budget checks) without planning;
- `rule@B`: the rule with its parameters (repeat count, window, planning, what an alarm does) tuned on the
  detector's validation traces for FP16 budget B, as the learned trigger's are (`training.fit.tune_rule_for_budgets`).

The cost model (documented in the README): a trace's modeled time is

    tokens_2bit * decode_2bit + tokens_fp16 * decode_fp16 + prefill_2bit * prefill_2bit_cost + prefill_fp16 * prefill_fp16_cost

with the four per-token costs *measured* on the machine at the start of the comparison (`measure_costs`:
a batch of `sampling.batch_size` prompts prefilled, then decoded for a fixed number of steps, best of
two). Because the embedded 2-bit model runs dequantized on a CPU (the same dense matmuls as FP16), its
measured per-token cost there is FP16's: the time model then says what rescue costs *on this machine*.
A second, memory-bound model states what it would cost where decoding is limited by reading the
weights (batch-1 decoding on a GPU): every decoded token costs the bytes of the weights of the
precision that produced it, measured as the stored size of each checkpoint's tensor files.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch

from inference.decoding.generate import Sampler, generate
from inference.prompts import render_prompt

from inference.config import METHODS  # noqa: F401  (re-exported: the methods compared here)
CONTROLLED = ("rule", "learned", "plan-only", "rescue-only")


def _budget_after(method: str, prefix: str) -> float | None:
    """The FP16 budget B of a method named `<prefix>@B`; None for a method not so named."""
    if not method.startswith(f"{prefix}@"):
        return None
    try:
        budget = float(method.split("@", 1)[1])
    except ValueError:
        budget = -1.0
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"method {method!r}: the FP16 budget after '@' must be a number in [0, 1]")
    return budget


def learned_budget(method: str, config) -> float | None:
    """The FP16 budget a learned method runs at: `learned@B` names it, `learned` takes `rescue.fp16_budget`;
    None for any other method."""
    return config.rescue.fp16_budget if method == "learned" else _budget_after(method, "learned")


def rule_budget(method: str) -> float | None:
    """The FP16 budget `rule@B` names; None for any other method."""
    return _budget_after(method, "rule")


def tuned_rule(detector, budget: float) -> dict | None:
    """The detector card's rule tuned for the largest calibrated FP16 budget not above `budget` (None where
    the card predates the tuning)."""
    from detector.policy import policy_for_budget

    tuned = (detector.card["calibration"].get("rules") or {}).get("for_budget") if detector is not None else None
    return policy_for_budget(tuned, budget) if tuned and tuned.get("budgets") else None


def build_trigger(method: str, config, tokenizer, detector=None):
    """The trigger of a controlled method (the learned ones need a loaded detector)."""
    from inference.control.triggers import AlwaysPlan, LearnedTrigger, RuleTrigger

    control = config.rescue
    if method in ("rule", "rescue-only"):
        return RuleTrigger(control.rule_ngram, control.rule_window, control.rule_count, config.sampling.budget,
                           control.rule_budget_fraction, plan=control.rule_plan and method == "rule",
                           think_close_id=tokenizer.convert_tokens_to_ids("</think>"))
    if rule_budget(method) is not None:
        entry = tuned_rule(detector, rule_budget(method))
        if entry is None:
            raise ValueError(f"method {method!r} needs a detector whose card holds the rule tuned per FP16 budget "
                             "(retrain it with `rescue train`)")
        trigger = RuleTrigger(control.rule_ngram, entry["window"], entry["count"], config.sampling.budget,
                              control.rule_budget_fraction, plan=entry["plan"],
                              think_close_id=tokenizer.convert_tokens_to_ids("</think>"))
        trigger.policy_name = (f"rule-tuned@{entry['fp16_budget']:g}: {control.rule_ngram}-gram {entry['count']}x "
                               f"within {entry['window']}, plan {'on' if entry['plan'] else 'off'}, "
                               f"on alarm {entry['on_alarm']}")
        return trigger
    if method == "plan-only":
        return AlwaysPlan()
    if learned_budget(method, config) is not None:
        return LearnedTrigger(detector, control.plan_probe_tokens, learned_budget(method, config), tokenizer=tokenizer)
    raise ValueError(f"method {method!r} has no trigger")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_costs(models: dict, tokenizer, questions: Sequence[str], batch_size: int, steps: int = 32,
                  repeats: int = 2) -> dict:
    """Seconds per prefilled and per decoded token of each precision, measured on this machine (best of
    `repeats`): one forward over a left-padded batch of prompts, then `steps` decoding steps of it."""
    prompts = [render_prompt(tokenizer, q) for q in list(questions)[:batch_size]]
    costs = {}
    for precision, model in models.items():
        device = next(model.parameters()).device
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
        prompt_tokens = int(encoded.attention_mask.sum())
        prefill, decode = [], []
        for _ in range(repeats + 1):  # the first round warms up
            _sync(device)
            began = time.perf_counter()
            model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask, logits_to_keep=1)
            _sync(device)
            prefill_seconds = time.perf_counter() - began
            began = time.perf_counter()
            generate(model, encoded.input_ids, encoded.attention_mask, max_new_tokens=steps, eos_token_ids=[],
                     pad_token_id=tokenizer.pad_token_id, sampler=Sampler())
            _sync(device)
            total = time.perf_counter() - began
            prefill.append(prefill_seconds / prompt_tokens)
            decode.append(max(total - prefill_seconds, 1e-9) / (steps * len(prompts)))
        costs[precision] = {"prefill_seconds_per_token": min(prefill[1:]), "decode_seconds_per_token": min(decode[1:]),
                            "batch": len(prompts), "steps": steps}
    return costs


def weight_bytes(fp16_folder: str | Path, quantized_folder: str | Path) -> dict:
    """Bytes of weights each decoded token reads in the memory-bound model: the tensor files of each
    precision's checkpoint as stored (FP16/BF16 weights; packed 2-bit weights with their scales, zeros and
    FP16 embeddings)."""
    def stored(folder) -> int | None:
        files = list(Path(folder).glob("*.safetensors"))
        return sum(f.stat().st_size for f in files) if files else None

    return {"fp16": stored(fp16_folder), "2bit": stored(quantized_folder)}


def modeled_costs(records, costs: dict, weights: dict, projection: ProjectedCosts | None = None) -> dict:
    """Per method: modeled seconds (time model), bytes of weights read (memory-bound model) and, with a
    projection, the seconds these tokens would take at its shape on its machine."""
    seconds = sum(
        r.tokens_2bit * costs["2bit"]["decode_seconds_per_token"]
        + r.tokens_fp16 * costs["fp16"]["decode_seconds_per_token"]
        + r.prefill_2bit * costs["2bit"]["prefill_seconds_per_token"]
        + r.prefill_fp16 * costs["fp16"]["prefill_seconds_per_token"]
        for r in records
    )
    # A step check is one FP16 forward pass: one more read of the FP16 weights, as a decoded token is.
    read = sum(r.tokens_2bit * (weights["2bit"] or 0) + (r.tokens_fp16 + r.checks_fp16) * (weights["fp16"] or 0)
               for r in records)
    result = {"modeled_seconds": seconds, "weight_bytes_read": read}
    if projection is not None:
        result["projected_seconds"] = sum(projection.seconds(r) for r in records)
    return result


class ProjectedCosts:
    """Per-token costs of a public Qwen3 shape on the machine `benchmarks/decode.py` ran on, read from its
    JSON, for projecting a comparison's token counts to that model (`rescue compare --costs F --shape S`).

    It answers "what would these traces cost if that model had generated them there": a trace's
    projected seconds are its tokens by precision times the measured decode cost per token at the
    comparison's batch size (the nearest measured batch) and at the trace's mean context (prompt +
    half its generated tokens, interpolated linearly between the measured contexts, clamped at their
    ends), plus its prefilled tokens times the measured prefill cost, plus one decode step of the
    model's for each of its prefill passes and FP16 step checks: a pass that reads a few tokens (a
    resumption from a kept cache) still reads the weights once, which the per-token prefill cost
    (measured on long prompts) does not price. Each precision's decode costs come from one kernel: the
    fastest of those measured at every context of that batch size.
    """

    def __init__(self, report: dict, shape: str, batch: int, source: str = ""):
        rows = [r for r in report.get("rows", []) if r.get("shape") == shape and r.get("step_seconds")]
        if not rows:
            raise ValueError(f"{source or 'decode benchmark'}: no measured decode steps for shape {shape!r} "
                             f"(measured: {', '.join(sorted({r.get('shape', '?') for r in report.get('rows', [])})) or 'none'})")
        self.shape, self.device, self.source = shape, report.get("device", "?"), source
        self.points: dict[str, list[tuple[int, float]]] = {}
        self.kernels: dict[str, str] = {}
        names = {"fp16": "bf16", "2bit": "2bit"}
        for name in names.values():
            if not any(r["precision"] == name for r in rows):
                raise ValueError(f"{source or 'decode benchmark'}: no {name} decode steps for shape {shape!r}")
        # The nearest batch size measured for both precisions, so that both costs are at the same batch.
        batches = set.intersection(*({r["batch"] for r in rows if r["precision"] == n} for n in names.values()))
        if not batches:
            raise ValueError(f"{source or 'decode benchmark'}: bf16 and 2bit were measured at no common batch size")
        self.batch = min(batches, key=lambda b: (abs(math.log(b / batch)), b))
        for precision, name in names.items():
            mine = [r for r in rows if r["precision"] == name]
            # One kernel's curve over context: among the kernels measured at every context of this batch
            # (a variant measured at one point only, e.g. a compiled step, cannot be interpolated), the fastest.
            curves: dict[str, dict[int, float]] = {}
            for r in mine:
                if r["batch"] == self.batch:
                    curves.setdefault(r["kernel"], {})[r["context"]] = r["step_seconds"] / r["batch"]
            widest = max(len(curve) for curve in curves.values())
            kernel, curve = min(((k, c) for k, c in curves.items() if len(c) == widest),
                                key=lambda item: sum(item[1].values()) / len(item[1]))
            self.kernels[precision] = kernel
            self.points[precision] = sorted(curve.items())
        loops = report.get("shapes", {}).get(shape, {})
        self.prefill = {"fp16": loops.get("loop_b1_1k_bf16", {}).get("prefill_per_token", 0.0),
                        "2bit": loops.get("loop_b1_1k_2bit_fused", {}).get("prefill_per_token", 0.0)}

    def decode(self, precision: str, context: float) -> float:
        points = self.points[precision]
        if context <= points[0][0]:
            return points[0][1]
        for (c0, t0), (c1, t1) in zip(points, points[1:]):
            if context <= c1:
                return t0 + (t1 - t0) * (context - c0) / (c1 - c0)
        return points[-1][1]

    def seconds(self, record) -> float:
        context = record.prompt_tokens + record.generated_tokens / 2
        return ((record.tokens_2bit + record.passes_2bit) * self.decode("2bit", context)
                + (record.tokens_fp16 + record.passes_fp16 + record.checks_fp16) * self.decode("fp16", context)
                + record.prefill_2bit * self.prefill["2bit"] + record.prefill_fp16 * self.prefill["fp16"])

    def describe(self) -> dict:
        return {"shape": self.shape, "device": self.device, "batch": self.batch, "source": self.source,
                "kernels": self.kernels,
                "decode_seconds_per_token": {p: dict(v) for p, v in self.points.items()},
                "prefill_seconds_per_token": self.prefill}


def load_projection(path: str | Path, shape: str, batch: int) -> ProjectedCosts:
    """`ProjectedCosts` from a `benchmarks/decode.py` JSON file (clear errors for a missing or malformed one)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such decode benchmark file") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
        raise ValueError(f"{path}: not a benchmarks/decode.py result (no 'rows' list)")
    return ProjectedCosts(report, shape, batch, source=str(path))


def comparison_table(summaries: dict[str, dict]) -> str:
    """Markdown table of a comparison (costs relative to the fp16 method when it ran)."""
    base = summaries.get("fp16", {})
    lines = [
        "| method | accuracy [95% CI] | 2-bit tokens mean / p90 | FP16 tokens mean / p90 | prefill tokens mean "
        "| actions | wall s | modeled s (x FP16) | memory-bound cost (x FP16) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    projected = all("projected_seconds" in s for s in summaries.values())
    if projected:
        lines[0] += " projected s (x FP16) |"
        lines[1] += " --- |"
    for method, s in summaries.items():
        low, high = s["accuracy_ci95"]
        actions = ", ".join(f"{k} {v}" for k, v in sorted(s["actions"].items())) or "-"
        ratio = lambda key: (f" ({s[key] / base[key]:.2f}x)" if base.get(key) else "")  # noqa: E731
        lines.append(
            f"| {method} | {s['accuracy']:.1%} [{low:.1%}, {high:.1%}] "
            f"| {s['mean_tokens_2bit']:.0f} / {s['p90_tokens_2bit']:.0f} "
            f"| {s['mean_tokens_fp16']:.0f} / {s['p90_tokens_fp16']:.0f}"
            + (f" (+{s['mean_checks_fp16']:.0f} checks) " if s.get("mean_checks_fp16") else " ")
            + f"| {s['mean_prefill_2bit'] + s['mean_prefill_fp16']:.0f} | {actions} | {s['wall_seconds']:.1f} "
            f"| {s['modeled_seconds']:.1f}{ratio('modeled_seconds')} "
            f"| {s['weight_bytes_read'] / 1e9:.2f} GB{ratio('weight_bytes_read')} |"
            + (f" {s['projected_seconds']:.2f}{ratio('projected_seconds')} |" if projected else "")
        )
    return "\n".join(lines)


def plot_comparison(summaries: dict[str, dict], records: dict[str, list], out_dir: Path,
                    ceilings: Sequence[dict] = ()) -> list[Path]:
    """accuracy-vs-cost.png (one point per method, both cost models; the learned trigger's budgets joined
    as its curve; the ceilings as dotted reference lines) and tokens.png (token distributions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    base = summaries.get("fp16")
    for axis, key, label in ((axes[0], "modeled_seconds", "modeled time (measured per-token costs)"),
                             (axes[1], "weight_bytes_read", "memory-bound cost (weight bytes read)")):
        position = lambda s: s[key] / base[key] if base and base[key] else s[key]  # noqa: E731
        for method, s in summaries.items():
            if method.startswith("ceiling-"):
                continue
            x = position(s)
            low, high = s["accuracy_ci95"]
            axis.errorbar([x], [s["accuracy"]], yerr=[[s["accuracy"] - low], [high - s["accuracy"]]], fmt="o",
                          capsize=3)
            axis.annotate(method, (x, s["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        curve = sorted((position(s), s["accuracy"]) for m, s in summaries.items()
                       if m == "learned" or m.startswith("learned@"))
        if len(curve) > 1:
            axis.plot(*zip(*curve), color="tab:green", alpha=0.6, label="learned, by FP16 budget")
        for row in ceilings:
            if row["ceiling"] != "fp16":
                axis.axhline(row["accuracy"], linestyle=":", color="grey", alpha=0.8)
                axis.annotate(f"ceiling: {row['ceiling']}", (axis.get_xlim()[0], row["accuracy"]),
                              textcoords="offset points", xytext=(2, 2), fontsize=7, color="grey")
        if len(curve) > 1:
            axis.legend(loc="lower right", fontsize=8)
        axis.set_xlabel(f"{label}{', relative to FP16' if base else ''}")
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    paths.append(out_dir / "accuracy-vs-cost.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    methods = list(records)
    for axis, attribute, title in ((axes[0], "tokens_2bit", "tokens generated by the 2-bit model"),
                                   (axes[1], "tokens_fp16", "tokens generated by the FP16 model")):
        axis.boxplot([[getattr(r, attribute) for r in records[m]] for m in methods], showfliers=True)
        axis.set_xticks(range(1, len(methods) + 1), methods, rotation=30, fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("tokens per trace")
    figure.tight_layout()
    paths.append(out_dir / "tokens.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


def ceilings_table(ceilings: Sequence[dict]) -> str:
    """Markdown table of the oracle ceilings (`training.ceilings`)."""
    lines = ["| ceiling | oracle policy | accuracy | 2-bit tokens mean | FP16 tokens mean | memory-bound cost (x FP16) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in ceilings:
        cost = row.get("memory_bound_x_fp16")
        lines.append(f"| {row['ceiling']} | {row['what']} | {row['accuracy']:.1%} | {row['mean_tokens_2bit']:.0f} "
                     f"| {row['mean_tokens_fp16']:.0f} | {'-' if cost is None else f'{cost:.2f}x'} |")
    return "\n".join(lines)


def write_comparison(out_dir: Path, summaries: dict, costs: dict, weights: dict, meta: dict,
                     projection: ProjectedCosts | None = None, ceilings: Sequence[dict] = ()) -> Path:
    """comparison.json and comparison.md in `out_dir` (next to the per-method records and plots)."""
    (out_dir / "comparison.json").write_text(json.dumps(
        {**meta, "costs": costs, "weight_bytes": weights, "methods": summaries, "ceilings": list(ceilings),
         "projection": projection.describe() if projection else None}, indent=2) + "\n")
    cost_lines = "\n".join(
        f"- {p}: prefill {c['prefill_seconds_per_token'] * 1e6:.1f} us/token, decode "
        f"{c['decode_seconds_per_token'] * 1e6:.1f} us/token (batch {c['batch']})" for p, c in costs.items())
    text = (f"# {meta['model']}: methods compared on {meta['benchmark']}/{meta['split']}\n\n"
            f"{meta['problems']} problems, the same seeds for every method; machine: {meta['device']}.\n\n"
            f"{comparison_table(summaries)}\n\nMeasured per-token costs (inputs of the modeled time):\n{cost_lines}\n"
            f"\nWeights read per decoded token (memory-bound model): FP16 {(weights['fp16'] or 0) / 1e6:.2f} MB, "
            f"2-bit {(weights['2bit'] or 0) / 1e6:.2f} MB.\n")
    policies = {m: s["policy"] for m, s in summaries.items() if s.get("policy") and m.startswith("learned")}
    if policies:
        text += "\nLearned action policy that ran: " + ", ".join(f"{m}: {p}" for m, p in policies.items()) + ".\n"
    if meta.get("rule_loop_check"):
        text += f"\nThe rule on the naive 2-bit traces: {meta['rule_loop_check']['line']}\n"
    if ceilings:
        text += f"\n## Ceilings (oracle policies on the same problems)\n\n{ceilings_table(ceilings)}\n"
    if projection is not None:
        d = projection.describe()["decode_seconds_per_token"]
        text += (f"\nProjected s: these traces' tokens at the per-token costs `benchmarks/decode.py` measured for "
                 f"{projection.shape} on {projection.device} (batch {projection.batch}; {projection.source}), a "
                 f"projection, not a run of that model. Decode ms/token by context: "
                 + "; ".join(f"{p} " + ", ".join(f"{c}: {t * 1e3:.3f}" for c, t in v.items()) for p, v in d.items())
                 + ".\n")
    (out_dir / "comparison.md").write_text(text)
    return out_dir
