"""Measure the failure regime of one model size: FP16 against its 4-, 3- and 2-bit GPTQ twins.

Evaluates the FP16 model, quantizes it to each bit width (GPTQ settings other than `bits` from the
config) and evaluates each twin, all on the same test problems with the config's sampling. Writes
into --out:
  regime-<size>.json          every summary, the settings, wall times and the device
  regime-<size>.md            the regime table (accuracy, lengths, budget / unclosed / loop shares: the
                              naive repetition check's, and the trace labeler's loop and delayed commitment)
  trace-lengths-<size>.png    generated-token histograms, FP16 against each bit width
  <size>-<b>bit/              the quantized models; <size>/evaluate-<precision>/ the evaluation records

Usage:
  python benchmarks/family_regime.py --config tiny-m --model.fp16 DIR --out OUT [--bits 4,3,2]
      [--limit 500] [--sampling.batch_size 500] [any --section.field VALUE of `rescue`]
  python benchmarks/family_regime.py --report OUT/regime-<size>.json   # redraw table and plot only (named after the record)
W&B is disabled unless --wandb says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from inference.config import load_config
from inference.decoding.models import load_tokenizer, resolve_model_source
from inference.errors import RescueError
from rescue import commands
from rescue.cli import add_config_flags, config_overrides
from training.labels import label_records, label_shares

TARGET = "FP16 accuracy >= 90%; 2-bit accuracy 15-75%; >= 15% of 2-bit traces loop or fail to commit; " \
         "2-bit mean length >= 1.3x FP16"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def generated_tokens(record_dir: Path) -> list[int]:
    with open(record_dir / "records.jsonl") as handle:
        return [json.loads(line)["generated_tokens"] for line in handle]


def labeled_shares(record_dir: Path, config) -> dict[str, float]:
    """The trace labeler's shares (`training.labels.label_shares`, with the config's `labels`
    parameters) over the traces of one evaluation record."""
    tokenizer = load_tokenizer(resolve_model_source(config.model.fp16, "model"))
    with open(record_dir / "records.jsonl") as handle:
        rows = [json.loads(line) for line in handle]
    return label_shares(label_records(rows, tokenizer, config.labels))


def measure(config_ref: str | None, overrides: dict, bits_list: list[int], limit: int, out: Path) -> dict:
    """Evaluate FP16 then each bit width; returns the regime record (also written as JSON)."""
    base = load_config(config_ref, overrides)
    size = base.model.name
    out.mkdir(parents=True, exist_ok=True)
    regime = {
        "model": size,
        "device": device_name(),
        "limit": limit,
        "bits": bits_list,
        "config": base.to_dict(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "precisions": [],
    }

    def evaluate(label: str, config, method: str, quantize_seconds: float | None = None) -> None:
        record_dir = out / size / f"evaluate-{label}"
        began = time.perf_counter()
        summary = commands.evaluate(config, method=method, limit=limit, out=str(record_dir))
        regime["precisions"].append({
            "precision": label,
            "bits": config.quantization.bits if method != "fp16" else 16,
            "group_size": config.quantization.group_size if method != "fp16" else None,
            "summary": summary,
            "quantize_seconds": quantize_seconds,
            "evaluate_seconds": round(time.perf_counter() - began, 1),
            "generated_tokens": generated_tokens(record_dir),
            "labels": labeled_shares(record_dir, config),
            "records": str(record_dir),
        })
        (out / f"regime-{size}.json").write_text(json.dumps(regime, indent=1) + "\n")

    evaluate("fp16", base, "fp16")
    for bits in bits_list:
        model_dir = out / f"{size}-{bits}bit"
        config = load_config(config_ref, {**overrides, "quantization.bits": bits, "model.quantized": str(model_dir)})
        began = time.perf_counter()
        commands.quantize(config, out=str(model_dir))
        # "2bit" is the evaluate command's name for the quantized twin, whatever its bit width.
        evaluate(f"{bits}bit", config, "2bit", quantize_seconds=round(time.perf_counter() - began, 1))
    regime["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / f"regime-{size}.json").write_text(json.dumps(regime, indent=1) + "\n")
    return regime


def by_precision(regime: dict) -> list[dict]:
    """The measured precisions from FP16 down to the fewest bits, whatever order they ran in."""
    return sorted(regime["precisions"], key=lambda row: -row["bits"])


def regime_table(regime: dict) -> str:
    """The markdown regime table: one row per precision, lengths relative to FP16."""
    rows = by_precision(regime)
    fp16_mean = next(r["summary"]["mean_generated_tokens"] for r in rows if r["precision"] == "fp16")
    lines = [
        "| precision | accuracy | mean tokens | p90 tokens | budget % | unclosed think % | loop % "
        "| loop-or-no-commit % | labeled loop % | delayed commitment % | length ratio vs FP16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        s = row["summary"]
        name = "FP16" if row["precision"] == "fp16" else f"{row['bits']}-bit g{row['group_size']}"
        lines.append(
            f"| {name} | {s['accuracy']:.1%} | {s['mean_generated_tokens']:.0f} | {s['p90_generated_tokens']:.0f} "
            f"| {s['budget_share']:.1%} | {s['unclosed_share']:.1%} | {s['loop_share']:.1%} "
            f"| {s['loop_or_no_commit_share']:.1%} | {labeled_columns(row)} | {s['mean_generated_tokens'] / fp16_mean:.2f}x |"
        )
    return "\n".join(lines)


def labeled_columns(row: dict) -> str:
    """The labeler's loop and delayed-commitment shares of a row ('- | -' in records made before they were kept)."""
    labels = row.get("labels")
    return f"{labels['loop']:.1%} | {labels['delayed_commitment']:.1%}" if labels else "- | -"


def target_check(regime: dict) -> list[str]:
    """Which parts of the target regime (MODEL_CARD.md) this run meets (needs FP16 and 2-bit rows)."""
    rows = {r["precision"]: r for r in regime["precisions"]}
    if "fp16" not in rows or "2bit" not in rows:
        return []
    fp16, low, labels = rows["fp16"]["summary"], rows["2bit"]["summary"], rows["2bit"].get("labels")
    ratio = low["mean_generated_tokens"] / fp16["mean_generated_tokens"]
    checks = [
        (f"FP16 accuracy {fp16['accuracy']:.1%} >= 90%", fp16["accuracy"] >= 0.9),
        (f"2-bit accuracy {low['accuracy']:.1%} in 15-75%", 0.15 <= low["accuracy"] <= 0.75),
        (f"2-bit loop-or-no-commit {low['loop_or_no_commit_share']:.1%} >= 15% (naive repetition check)",
         low["loop_or_no_commit_share"] >= 0.15),
        (f"2-bit length ratio {ratio:.2f}x >= 1.3x", ratio >= 1.3),
    ]
    if labels:
        share = labels["loop_or_fails_to_commit"]
        checks.insert(3, (f"2-bit loop-or-fails-to-commit {share:.1%} >= 15% (trace labeler)", share >= 0.15))
    return [f"- {'met' if ok else 'MISSED'}: {text}" for text, ok in checks]


def calibration_source(calibration: dict) -> str:
    """Where the calibration texts came from (benchmark/split, or the local file a path names), and
    "prompts only" when they leave out the worked solutions."""
    source = (f"{calibration['benchmark']} ({Path(calibration['path']).name})" if calibration.get("path")
              else f"{calibration['benchmark']}/{calibration['split']}")
    return source + (", prompts only" if calibration.get("text") == "question" else "")


def gptq_settings(quantization: dict) -> str:
    """One line of the GPTQ settings other than the bit width (group size is in the table)."""
    calibration = quantization["calibration"]
    kept = f", kept in FP16: {', '.join(quantization['keep_fp16'])}" if quantization.get("keep_fp16") else ""
    return (f"GPTQ: desc_act {quantization['desc_act']}, damp {quantization['damp_percent']}, calibration on "
            f"{calibration['size']} problems of {calibration_source(calibration)}{kept}.")


def write_report(regime: dict, out: Path, stem: str | None = None) -> Path:
    """Write the markdown table `<stem>.md` and the trace-length plot beside the JSON record; returns the table's path.

    `stem` is the record's name without `.json` (default `regime-<size>`); the plot is named after it
    (`regime-tiny-m-seed1` -> `trace-lengths-tiny-m-seed1.png`)."""
    size = regime["model"]
    stem = stem or f"regime-{size}"
    sampling = regime["config"]["sampling"]
    lines = [
        f"# Failure regime of {size}",
        "",
        f"{regime['limit']} problems of {regime['config']['benchmark']['name']}/{regime['config']['benchmark']['split']}, "
        f"T={sampling['temperature']}, top-p {sampling['top_p']}, top-k {sampling['top_k']}, "
        f"budget {sampling['budget']} tokens, seed {sampling['seed']}; {regime['device']}, {regime['started']}.",
        gptq_settings(regime["config"]["quantization"]),
        "",
        regime_table(regime),
        "",
        f"Target ({TARGET}):",
        *target_check(regime),
        "",
    ]
    table = out / f"{stem}.md"
    table.write_text("\n".join(lines))
    plot_trace_lengths(regime, out / f"trace-lengths-{stem.removeprefix('regime-')}.png")
    return table


def plot_trace_lengths(regime: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    budget = regime["config"]["sampling"]["budget"]
    bins = np.linspace(0, budget, 65)
    figure, axis = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for row in by_precision(regime):
        tokens = row["generated_tokens"]
        label = f"{'FP16' if row['precision'] == 'fp16' else row['precision'].replace('bit', '-bit')} " \
                f"(mean {np.mean(tokens):.0f})"
        if row["precision"] == "fp16":
            axis.hist(tokens, bins=bins, color="0.7", label=label)
        else:
            axis.hist(tokens, bins=bins, histtype="step", linewidth=1.5, label=label)
    axis.axvline(budget, color="k", linestyle=":", linewidth=1)
    axis.set_xlabel("generated tokens per trace")
    axis.set_ylabel("traces")
    axis.set_title(f"{regime['model']}: trace lengths, {regime['limit']} test problems")
    axis.legend(frameon=False, fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def parse_bits(text: str) -> list[int]:
    try:
        bits_list = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise RescueError(f"--bits must be comma-separated integers such as 4,3,2, got {text!r}") from None
    if not bits_list:
        raise RescueError("--bits names no bit width")
    return bits_list


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_flags(parser)
    parser.add_argument("--out", default="runs/regime", help="output folder (default: runs/regime)")
    parser.add_argument("--bits", default="4,3,2", help="bit widths to quantize to, comma-separated (default 4,3,2)")
    parser.add_argument("--limit", type=int, default=500, help="test problems (default 500)")
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="only redraw the table and plot of an existing regime-<size>.json")
    args = parser.parse_args(argv)
    try:
        if args.report:
            path = Path(args.report)
            try:
                regime = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise RescueError(f"--report {path}: not a readable regime record ({error})") from None
            table = write_report(regime, path.parent, path.stem)  # beside the record, under its name
        else:
            bits_list = parse_bits(args.bits)
            overrides = {"wandb.mode": "disabled", **config_overrides(args)}
            out = Path(args.out)
            regime = measure(args.config, overrides, bits_list, args.limit, out)
            table = write_report(regime, out)
    except RescueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
