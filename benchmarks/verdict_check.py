"""How well a family model tells agreeing verification passes from disagreeing ones.

The embedded family's traces close every verification pass with a verdict: "That gives X, as
before." when the pass agrees with the result before it, "That gives X, not Y." when it does not.
A model that says "not" after an agreeing pass verifies again, so this one decision is where the
family's 2-bit loops come from (MODEL_CARD.md). This script teacher-forces traces written by the
task's generator (`training/arith.py`, the config's trace style) up to "That gives X, " and reads
the model's next-token choice between "as" and "not" at the sampling temperature, split by what
the trace actually says next. It takes under a minute per model on a 2-core CPU (400 verdicts), so
a quantized twin can be checked before a full evaluation.

Usage:
  python benchmarks/verdict_check.py --config tiny-m MODEL_DIR [MODEL_DIR ...] [--verdicts 400]
      [--style-from FP16_DIR]  (traces in the style that model was trained on, not the config's)
MODEL_DIR is an FP16 folder or a quantized one (a folder with quantize_config.json, loaded
dequantized on the CPU). Prints one markdown row per model and verdict kind: how many verdicts, the
mean probability of "not" (renormalized over "as" and "not"), and the share where "not" is the
likelier choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root

from inference.config import PretrainConfig, load_config
from inference.errors import RescueError

VERDICT = re.compile(r"That gives -?\d+, (as before|not)")


def trained_style(model_dir: str) -> dict[str, object]:
    """The trace style a family model was trained on, as `pretrain.` overrides (from its pretrain.json)."""
    record = Path(model_dir) / "pretrain.json"
    try:
        style = json.loads(record.read_text())["trace_style"]
    except FileNotFoundError:
        raise RescueError(f"{record}: no such file (--style-from takes an FP16 folder written by rescue pretrain)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RescueError(f"{record}: expected a JSON object with a 'trace_style' object") from None
    if not isinstance(style, dict):
        raise RescueError(f"{record}: expected 'trace_style' to be an object, got {type(style).__name__}")
    # TraceStyle fields the pretrain section does not name (max_rechecks) kept their defaults in training.
    named = {field.name for field in dataclasses.fields(PretrainConfig)}
    return {f"pretrain.{name}": value for name, value in style.items() if name in named}


def verdict_prefixes(config_ref: str | None, problems: int, seed: int, limit: int, tokenizer,
                     style: dict[str, object] | None = None) -> list[tuple[str, str]]:
    """(text up to and including the space after "That gives X,", "agree" or "disagree") from generated
    traces of the config's style, or of `style` (`pretrain.` overrides, e.g. `trained_style`)."""
    from training.pretrain import ArithTraceData

    spec = load_config(config_ref, {**(style or {}), "pretrain.train_problems": problems, "pretrain.val_problems": 1,
                                    "pretrain.seed": seed}).pretrain
    data = ArithTraceData(tokenizer, spec)
    data.setup()
    found = []
    for ids, _ in data.train_set.examples:
        text = tokenizer.decode(ids)
        for match in VERDICT.finditer(text):
            found.append((text[: match.start(1)], "agree" if match.group(1) == "as before" else "disagree"))
    return found[:limit]


def load(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    from inference.decoding.models import load_quantized

    if not Path(path).is_dir():
        raise RescueError(f"{path}: no such model folder")
    if (Path(path) / "quantize_config.json").exists():
        model, _ = load_quantized(path, device="cpu", kernel="dequantized", dtype="float32")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def not_probabilities(model, tokenizer, prefixes: list[tuple[str, str]], temperature: float) -> dict[str, list[float]]:
    import torch

    as_id, not_id = (tokenizer.encode(piece, add_special_tokens=False)[0] for piece in ("a", "n"))
    found: dict[str, list[float]] = {"agree": [], "disagree": []}
    for prefix, kind in prefixes:
        ids = torch.tensor([tokenizer.encode(prefix, add_special_tokens=False)])
        with torch.no_grad():
            logits = model(ids).logits[0, -1] / temperature
        pair = torch.softmax(logits[[as_id, not_id]], dim=-1)
        found[kind].append(float(pair[1]))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="FP16 or quantized model folders")
    parser.add_argument("--config", default="tiny-m", help="config whose trace style writes the traces")
    parser.add_argument("--style-from", default=None, metavar="MODEL_DIR",
                        help="write the traces in the style this FP16 model was trained on (its pretrain.json) "
                        "instead of the config's")
    parser.add_argument("--problems", type=int, default=600, help="generated traces to draw verdicts from")
    parser.add_argument("--seed", type=int, default=7, help="generator seed (not the training seed)")
    parser.add_argument("--verdicts", type=int, default=400, help="verdicts checked per model")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        from training.tokenizer import build_tokenizer

        tokenizer = build_tokenizer()
        temperature = load_config(args.config).sampling.temperature
        style = trained_style(args.style_from) if args.style_from else None
        prefixes = verdict_prefixes(args.config, args.problems, args.seed, args.verdicts, tokenizer, style)
        source = args.style_from or args.config
        if not prefixes:
            raise RescueError(f"the trace style of {source} wrote no verdicts in {args.problems} traces")
        results = {}
        print(f"| model | passes | verdicts | mean P(not), T={temperature} | share where not is likelier |")
        print("| --- | --- | --- | --- | --- |")
        for path in args.models:
            found = not_probabilities(load(path), tokenizer, prefixes, temperature)
            results[path] = found
            for kind, values in found.items():
                mean = sum(values) / len(values) if values else float("nan")
                share = sum(v > 0.5 for v in values) / len(values) if values else float("nan")
                print(f"| {path} | {kind} | {len(values)} | {mean:.3f} | {share:.1%} |", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"config": args.config, "style": style, "temperature": temperature,
                                                  "results": results}) + "\n")
    except RescueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
