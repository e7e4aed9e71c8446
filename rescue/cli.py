"""`rescue <stage>`: argparse subcommands whose config flags are generated from the config dataclasses.

Every config field is a `--section.field` flag (help text from the field), so nothing is declared
twice; `--config` picks the YAML file (a path or a shipped name, default tiny-m) and flags override it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from inference.config import DEFAULT_CONFIG, METHODS, config_fields, load_config
from inference.errors import RescueError
from training.texts import add_text_flags, text_fields

# Short spellings of the most used fields.
ALIASES = {"benchmark": "benchmark.name", "wandb": "wandb.mode", "budget": "sampling.budget"}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"YAML config: a path or a shipped name (default: {DEFAULT_CONFIG})")
    for alias, dotted in ALIASES.items():
        parser.add_argument(f"--{alias}", dest=f"cfg:{dotted}", default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"same as --{dotted}")
    group = parser.add_argument_group("config fields (override the YAML file)")
    for dotted, field, kind in config_fields():
        text = field.metadata.get("help", "")
        if "choices" in field.metadata:
            text += f" {{{', '.join(str(c) for c in field.metadata['choices'])}}}"
        group.add_argument(f"--{dotted}", dest=f"cfg:{dotted}", default=argparse.SUPPRESS, metavar="VALUE",
                           help=text)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    kinds = {dotted: kind for dotted, _, kind in config_fields()}
    overrides = {}
    for key, raw in vars(args).items():
        if not key.startswith("cfg:"):
            continue
        dotted = key[4:]
        if kinds[dotted] in (str, str | None) and raw not in ("null", "~"):
            overrides[dotted] = raw
        else:
            try:
                overrides[dotted] = yaml.safe_load(raw)
            except yaml.YAMLError:
                overrides[dotted] = raw
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rescue",
        description="lowbit-rescue: make 2-bit reasoning models usable (quantize, evaluate, ...).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quantize = commands.add_parser("quantize", help="make the 2-bit GPTQ twin of the config's model",
                                   description="Quantize model.fp16 with GPTQModel (bits, group size and "
                                               "calibration problems from the config) into a local folder.")
    add_config_flags(quantize)
    quantize.add_argument("--out", default=None, help="output folder (default: the config's 2-bit model folder)")

    evaluate = commands.add_parser("evaluate", help="run one method on a benchmark and grade it",
                                   description="Generate one trace per problem, grade the final answers and "
                                               "write an evaluation record (records.jsonl, summary.json).")
    add_config_flags(evaluate)
    evaluate.add_argument("--method", choices=METHODS, default="2bit",
                          help="fp16: the full-precision model; 2bit: its GPTQ twin (default); rule / learned: "
                               "2-bit with the rule or the learned trigger's rescue; plan-only: an FP16 plan, no "
                               "in-trace rescue; rescue-only: the rule's in-trace rescue without planning")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    evaluate.add_argument("--out", default=None, help="record folder (default: <output_dir>/<model>/evaluate-...)")
    compare = commands.add_parser("compare", help="every method on the same problems: table, plots, W&B",
                                  description="Run fp16, 2bit, rule, learned, plan-only and rescue-only on the same "
                                              "problems with the same seeds; measure each precision's per-token "
                                              "costs; write per-method records, comparison.md/json and plots.")
    add_config_flags(compare)
    compare.add_argument("--methods", default=None,
                         help=f"comma-separated list of {','.join(METHODS)}, learned@B (the learned trigger at FP16 "
                              "budget B), rule@B (the rule tuned for FP16 budget B on the detector's validation "
                              "traces) and the oracle ceilings ceiling-loop, ceiling-step (default: every method, "
                              "rule@ at rescue.fp16_budget, learned at each of rescue.curve_budgets, and the ceilings)")
    compare.add_argument("--limit", type=int, default=None, help="only the first N problems")
    compare.add_argument("--out", default=None, help="report folder (default: <output_dir>/<model>/compare-...)")
    compare.add_argument("--costs", default=None, metavar="DECODE_JSON",
                         help="a benchmarks/decode.py result: add each method's projected time at a Qwen3 shape")
    compare.add_argument("--shape", default=None,
                         help="the Qwen3 shape to project to with --costs (default: the config's model name)")

    run = commands.add_parser("run", help="the main job: quantize, collect, label, train, compare; one report",
                              description="On the config's model (default: the embedded tiny-m and its shipped "
                                          "2-bit twin): quantize, collect and label train/val traces, train the "
                                          "detector, compare every method on the test split and write a report "
                                          "folder. Stages whose outputs exist and match the config are skipped.")
    add_config_flags(run)
    run.add_argument("--train-limit", type=int, default=None,
                     help="training problems to collect (default: rescue.run_train_problems)")
    run.add_argument("--val-limit", type=int, default=None,
                     help="validation problems to collect (default: rescue.run_val_problems)")
    run.add_argument("--test-limit", type=int, default=None,
                     help="test problems to compare on (default: rescue.run_test_problems)")
    run.add_argument("--out", default=None, help="report folder (default: <output_dir>/<model>/report)")

    collect = commands.add_parser("collect", help="write a trace set: traces and hidden states of a split",
                                  description="Generate traces of the 2-bit (or FP16) model over a benchmark split "
                                              "through the step hook and write a resumable trace set (manifest + "
                                              "shards with hidden states at a stride and around label events). "
                                              "Under torchrun each rank takes every N-th shard.")
    add_config_flags(collect)
    collect.add_argument("--split", default="train", help="benchmark split to collect (train, val, test)")
    collect.add_argument("--samples", type=int, default=None, help="sampled traces per problem (default: capture.samples)")
    collect.add_argument("--limit", type=int, default=None, help="only the first N problems")
    collect.add_argument("--precision", choices=("2bit", "fp16"), default="2bit", help="which model generates")
    collect.add_argument("--out", default=None, help="trace set folder (default: <output_dir>/<model>/traces-...)")

    label = commands.add_parser("label", help="label where the traces of a trace set go wrong",
                                description="Compute loop onsets, budget exhaustion, unclosed think, commitment, "
                                            "first candidate answers and the probe's per-position targets from "
                                            "token ids and text; write labels.json beside the traces and a "
                                            "label report (table + PNG plots, logged to W&B).")
    label.add_argument("traces", nargs="?", default=None, help="trace set folder (written by rescue collect)")
    add_config_flags(label)
    label.add_argument("--report", default=None, help="report folder (default: <traces>/label-report)")
    add_text_flags(label)

    train = commands.add_parser("train", help="train the learned detector on labeled trace sets",
                                description="Fit the two-head probe on the hidden states of a labeled trace set "
                                            "(split by problem unless --val is given), early-stop on validation "
                                            "AUPRC, calibrate thresholds for the target false-alarm rate and write "
                                            "the detector artifact (weights + card); W&B offline by default.")
    train.add_argument("--traces", required=True, help="labeled training trace set (rescue collect + rescue label)")
    add_config_flags(train)
    train.add_argument("--val", default=None, help="labeled validation trace set (default: held-out problems of --traces)")
    train.add_argument("--test", default=None, help="labeled test trace set: run the offline comparison with the rule after training")
    train.add_argument("--out", default=None, help="detector folder (default: <output_dir>/<model>/detector)")

    report = commands.add_parser("detect-report", help="compare the learned trigger with the rule on held-out traces",
                                 description="Replay a labeled test trace set step by step with the detector's "
                                             "calibrated trigger and the repeated-n-gram rule tuned to the same "
                                             "false-alarm rate: loops caught, false alarms, lead times, plots.")
    report.add_argument("--test", default=None, help="labeled test trace set")
    add_config_flags(report)
    report.add_argument("--detector", default=None, help="detector folder (default: <output_dir>/<model>/detector)")
    report.add_argument("--out", default=None, help="report folder (default: <output_dir>/<model>/detect-report)")
    report.add_argument("--text-only", action="store_true", help="replay only the rule (no detector, no hidden states)")
    report.add_argument("--target", type=float, default=0.1,
                        help="text only: false-alarm rate per healthy trace the rule is calibrated for")
    add_text_flags(report)

    pretrain = commands.add_parser("pretrain", help="train an embedded family model (tiny-s/m/l)",
                                   description="Train the config's embedded reasoning model on synthetic "
                                               "arithmetic traces with Lightning (GPU if present), checkpoint "
                                               "every epoch and save it as a Hugging Face folder at model.fp16.")
    add_config_flags(pretrain)
    pretrain.add_argument("--out", default=None, help="model folder (default: the config's model.fp16)")
    pretrain.add_argument("--resume", action="store_true",
                          help="continue from the newest epoch checkpoint in <output_dir>/<model>/pretrain/"
                               "checkpoints (a run that was stopped), with the same config")
    pretrain.add_argument("--init", default=None, metavar="MODEL_DIR",
                          help="start from the weights of this saved model folder (same architecture), with a "
                               "fresh optimizer and schedule: continued training on the traces of pretrain.seed")
    for command in commands.choices.values():
        command.add_argument("--verbose", action="store_true",
                             help="show the libraries' own logs and progress bars on the console (they always go "
                                  "to <output_dir>/<model>/logs/<command>-<time>.log)")
    return parser


def quiet_library_noise() -> None:
    """Silence import-time deprecation chatter of torch/torchao that says nothing about the user's run."""
    import logging
    import os

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_noise()
    from rescue import commands

    try:
        config = load_config(args.config, config_overrides(args))
        from inference.console import log_file_for, route_library_logs
        from inference.tracking import check_wandb_mode

        route_library_logs(log_file_for(config.output_dir, config.model.name, args.command), verbose=args.verbose)
        check_wandb_mode(config.wandb)
        if args.command == "quantize":
            commands.quantize(config, out=args.out)
        elif args.command == "evaluate":
            commands.evaluate(config, method=args.method, limit=args.limit, out=args.out)
        elif args.command == "compare":
            methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
            commands.compare(config, limit=args.limit, methods=methods, out=args.out, costs_file=args.costs,
                             shape=args.shape)
        elif args.command == "run":
            commands.run(config, train_limit=args.train_limit, val_limit=args.val_limit,
                         test_limit=args.test_limit, out=args.out)
        elif args.command == "collect":
            commands.collect(config, split=args.split, samples=args.samples, limit=args.limit, out=args.out,
                             precision=args.precision)
        elif args.command == "label":
            commands.label(config, traces=args.traces, report=args.report, texts=args.texts,
                           tokenizer=args.tokenizer, fields=text_fields(args))
        elif args.command == "train":
            commands.train(config, traces=args.traces, val=args.val, out=args.out, test=args.test)
        elif args.command == "detect-report":
            commands.detect_report(config, test=args.test, detector=args.detector, out=args.out, texts=args.texts,
                                   tokenizer=args.tokenizer, fields=text_fields(args), text_only=args.text_only,
                                   target=args.target)
        elif args.command == "pretrain":
            commands.pretrain(config, out=args.out, resume=args.resume, init=args.init)
    except RescueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
