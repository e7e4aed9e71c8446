"""Sweep low-bit quantization recipes of one model size: quantize with each recipe and evaluate it.

All recipes run in one process on the same test problems with the config's sampling (the GPU
warm-up is paid once), after an FP16 evaluation of the same problems that the length ratios refer
to. A recipe is a name and config overrides, e.g.
  --recipe "g128-cal8:quantization.group_size=128,quantization.calibration.size=8"
(values are read as YAML: scalars, or flow lists such as quantization.keep_fp16=[mlp,o_proj], whose
commas do not split the recipe). Writes into --out, after every row:
  sweep-<size>.json   every summary, the recipe overrides, quantize/evaluate wall times, the device
  sweep-<size>.md     one table row per recipe: its settings (with the keep_fp16 patterns), then the
                      columns of benchmarks/family_regime.py (the trace labeler's among them)

Usage:
  python benchmarks/quant_sweep.py --config tiny-m --model.fp16 DIR --out OUT --limit 300 \
      --recipe NAME:k=v,k=v [--recipe ...] [--sampling.batch_size 300] [--no-fp16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root

from benchmarks.family_regime import (TARGET, calibration_source, device_name, generated_tokens, labeled_columns,
                                      labeled_shares)
from inference.config import load_config
from inference.errors import RescueError
from inference.decoding.models import resolve_model_source
from inference.evaluation.compare import weight_bytes
from rescue import commands
from rescue.cli import add_config_flags, config_overrides


def parse_recipe(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    if not name.strip():
        raise RescueError(f"--recipe needs NAME:key=value,...; got {text!r}")
    overrides = {}
    for item in filter(None, (part.strip() for part in _split_top_level(body))):
        key, sep, value = item.partition("=")
        if not sep:
            raise RescueError(f"--recipe {name}: '{item}' is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name.strip(), overrides


def _split_top_level(body: str) -> list[str]:
    """`body` split at the commas outside brackets, braces and parentheses."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(body):
        depth += (char in "[{(") - (char in "]})")
        if char == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    return parts + [body[start:]]


def table(sweep: dict) -> str:
    rows = sweep["rows"]
    fp16 = next((r for r in rows if r["recipe"] == "fp16"), None)
    lines = [
        "| recipe | bits | group | desc_act | damp | calib. | kept FP16 | weights vs FP16 | accuracy | mean tokens | p90 tokens | budget % "
        "| unclosed think % | loop % | loop-or-no-commit % | labeled loop % | delayed commitment % "
        "| length ratio vs FP16 | quantize s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        s, q = row["summary"], row["quantization"]
        ratio = f"{s['mean_generated_tokens'] / fp16['summary']['mean_generated_tokens']:.2f}x" if fp16 else "n/a"
        if row["recipe"] == "fp16":
            setting = "| 16 | - | - | - | - | - | 1.00x "
        else:
            kept = ", ".join(f"`{pattern}`" for pattern in q.get("keep_fp16", [])) or "-"
            wider = ", ".join(f"`{pattern}`" for pattern in q.get("wider", []))
            bits = f"{q['bits']} ({wider}: {q['wider_bits']})" if wider else f"{q['bits']}"
            weights = row.get("weights") or {}
            share = f"{weights['2bit'] / weights['fp16']:.2f}x" if weights.get("2bit") and weights.get("fp16") else "n/a"
            setting = (f"| {bits} | {q['group_size']} | {q['desc_act']} | {q['damp_percent']} "
                       f"| {q['calibration']['size']} {calibration_source(q['calibration'])} "
                       f"| {kept} | {share} ")
        lines.append(
            f"| {row['recipe']} {setting}| {s['accuracy']:.1%} | {s['mean_generated_tokens']:.0f} "
            f"| {s['p90_generated_tokens']:.0f} | {s['budget_share']:.1%} | {s['unclosed_share']:.1%} "
            f"| {s['loop_share']:.1%} | {s['loop_or_no_commit_share']:.1%} | {labeled_columns(row)} | {ratio} "
            f"| {row['quantize_seconds'] if row['quantize_seconds'] is not None else '-'} |"
        )
    return "\n".join(lines)


def write(sweep: dict, out: Path) -> None:
    size = sweep["model"]
    (out / f"sweep-{size}.json").write_text(json.dumps(sweep, indent=1) + "\n")
    sampling = sweep["config"]["sampling"]
    text = [
        f"# Quantization sweep of {size}",
        "",
        f"{sweep['limit']} problems of {sweep['config']['benchmark']['name']}/{sweep['config']['benchmark']['split']}, "
        f"T={sampling['temperature']}, top-p {sampling['top_p']}, top-k {sampling['top_k']}, budget {sampling['budget']}, "
        f"seed {sampling['seed']}, batch {sampling['batch_size']}; {sweep['device']}, {sweep['started']}.",
        "",
        table(sweep),
        "",
        f"Target: {TARGET}.",
        *[f"- failed: {f['recipe']}: {f['error']}" for f in sweep["failures"]],
        "",
    ]
    (out / f"sweep-{size}.md").write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_flags(parser)
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--recipe", action="append", default=[], help="NAME:key=value,... (repeatable)")
    parser.add_argument("--no-fp16", action="store_true", help="skip the FP16 reference evaluation")
    args = parser.parse_args(argv)
    try:
        recipes = [parse_recipe(text) for text in args.recipe]
        overrides = {"wandb.mode": "disabled", **config_overrides(args)}
        base = load_config(args.config, overrides)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        size = base.model.name
        sweep = {"model": size, "device": device_name(), "limit": args.limit, "config": base.to_dict(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": [], "failures": []}

        def evaluate(name, config, method, recipe, quantize_seconds):
            record_dir = out / size / f"evaluate-{name}"
            began = time.perf_counter()
            summary = commands.evaluate(config, method=method, limit=args.limit, out=str(record_dir))
            sweep["rows"].append({
                "recipe": name, "overrides": recipe, "quantization": config.to_dict()["quantization"],
                "summary": summary, "quantize_seconds": quantize_seconds,
                "evaluate_seconds": round(time.perf_counter() - began, 1),
                "generated_tokens": generated_tokens(record_dir),
                "labels": labeled_shares(record_dir, config),
                # Stored weight bytes against the FP16 checkpoint's: the memory-bound cost of a token.
                "weights": (weight_bytes(resolve_model_source(config.model.fp16), config.quantized_path)
                            if method == "2bit" else None),
            })
            write(sweep, out)
            print(table(sweep).splitlines()[-1], flush=True)

        if not args.no_fp16:
            evaluate("fp16", base, "fp16", {}, None)
        for name, recipe in recipes:
            model_dir = out / f"{size}-{name}"
            try:
                config = load_config(args.config, {**overrides, **recipe, "model.quantized": str(model_dir)})
                began = time.perf_counter()
                commands.quantize(config, out=str(model_dir))
                evaluate(name, config, "2bit", recipe, round(time.perf_counter() - began, 1))
            except Exception as error:  # one failing recipe must not cost the others
                traceback.print_exc()
                sweep["failures"].append({"recipe": name, "overrides": recipe,
                                          "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"})
                write(sweep, out)
        sweep["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        write(sweep, out)
    except RescueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((out / f"sweep-{size}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
