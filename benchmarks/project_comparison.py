"""Project a stored comparison's token counts to a Qwen3 shape's measured per-token costs, from the
per-method summaries alone (no rerun): what `rescue compare --costs F --shape S` adds as
"projected s", for comparisons whose records were not kept.

`ProjectedCosts` (inference/evaluation/compare.py) prices a trace's decoded tokens at its mean context; below
the lowest measured context its costs are flat, so when every trace's context is below it (tiny
models: budget 1024, prompts of about 200 tokens, against a lowest measured context of 1024) the
sum over traces is the summary's mean token counts times the number of problems, exactly. The
script refuses a comparison whose budget could take a trace past that point.

    python benchmarks/project_comparison.py docs/compare/run-tiny-m-cpu.json \
        benchmarks/results/decode-h200-run1.json --shapes qwen3-8b qwen3-32b --budget 1024

A step check is priced at its prefilled tokens plus one FP16 decode step (its read of the FP16 weights), and
so is every prefill pass of either model (where the comparison counted them: `mean_passes_*`).

`--steps F...` (`benchmarks/decode_step.py` JSONs of the same shape) replace the decode costs at each batch
they measured by the fastest step per precision there (a compiled one, say), both precisions of a batch from
one file: the one whose fastest bf16 step at that batch is fastest (FP16 is priced at its best; `--leave-out`
drops steps by kernel name, a path the rescue does not take, say); prefill costs stay
the decode.py file's unless `--prefill F` (a `benchmarks/prefill.py` JSON of the same shape) replaces
them with its bf16 and 2-bit prefill per token at its longest prompt (2-bit: the `--prefill-path` path).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from inference.evaluation.compare import ProjectedCosts, load_projection


def method_summaries(path: Path) -> dict[str, dict]:
    """Per-method summaries of a comparison JSON: `rescue run`'s (`comparison`) or `rescue compare`'s (`methods`)."""
    report = json.loads(path.read_text())
    summaries = report.get("comparison") or report.get("methods")
    if not isinstance(summaries, dict) or "fp16" not in summaries:
        raise ValueError(f"{path}: no per-method comparison with an fp16 method ('comparison' or 'methods')")
    return summaries


def projected_seconds(summary: dict, costs: ProjectedCosts, prefill: bool = True) -> float:
    """Seconds of a method's traces at `costs` (flat below the lowest measured context). With `prefill`,
    the prefilled tokens at the prefill costs and, for every FP16 step check and every prefill pass, one
    decode step of its model on top of its tokens: a pass that reads a few cached tokens still reads the
    weights once, which the per-token prefill cost (measured on long prompts) does not price."""
    lowest = 0.0  # ProjectedCosts clamps every context below its lowest point to that point's cost
    seconds = (summary["mean_tokens_2bit"] * costs.decode("2bit", lowest)
               + summary["mean_tokens_fp16"] * costs.decode("fp16", lowest))
    if prefill:
        seconds += (summary["mean_prefill_2bit"] * costs.prefill["2bit"]
                    + summary["mean_prefill_fp16"] * costs.prefill["fp16"]
                    + summary.get("mean_passes_2bit", 0.0) * costs.decode("2bit", lowest)
                    + (summary.get("mean_checks_fp16", 0.0) + summary.get("mean_passes_fp16", 0.0))
                    * costs.decode("fp16", lowest))
    return summary["problems"] * seconds


def benchmark_record(path: Path, script: str, table: str, kind: type, shape: str) -> dict:
    """The JSON record `script` wrote to `path`, with its `table` of type `kind`, measured at `shape` (exits with one
    line naming the file otherwise)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        sys.exit(f"{path}: not a readable benchmarks/{script} JSON ({error})")
    if not isinstance(report, dict) or not isinstance(report.get(table), kind):
        sys.exit(f"{path}: not a benchmarks/{script} result (no '{table}' {kind.__name__})")
    if report.get("shape") != shape or report.get("overrides"):
        changed = f" with {report['overrides']}" if report.get("overrides") else ""
        sys.exit(f"{path}: measured shape {report.get('shape')!r}{changed}, not {shape!r}")
    return report


def fastest_steps_of(paths: list[Path], shape: str, leave_out: tuple[str, ...] = ()
                     ) -> dict[tuple[str, int], tuple[int, float, str]]:
    """`fastest_steps` of several records: each batch's bf16 and 2-bit steps from the record whose fastest bf16
    step at that batch is fastest (so that both precisions of a batch were measured in one run)."""
    found = [fastest_steps(path, shape, leave_out) for path in paths]
    best = {}
    for batch in sorted({batch for steps in found for _, batch in steps}):
        both = [steps for steps in found if ("bf16", batch) in steps and ("2bit", batch) in steps]
        if both:
            chosen = min(both, key=lambda steps: steps["bf16", batch][1])
            best.update({key: value for key, value in chosen.items() if key[1] == batch})
    return best


def fastest_steps(path: Path, shape: str, leave_out: tuple[str, ...] = ()
                  ) -> dict[tuple[str, int], tuple[int, float, str]]:
    """(precision, batch) -> (context, seconds per token, kernel and attention) of the fastest measured step,
    steps whose kernel names contain any of `leave_out` left out."""
    report = benchmark_record(path, "decode_step.py", "steps", list, shape)
    best = {}
    for row in report["steps"]:
        if any(text in row.get("kernel", "") for text in leave_out):
            continue
        if isinstance(row.get("step_seconds"), float) and row.get("context") is not None:
            key, per_token = (row["precision"], row["batch"]), row["step_seconds"] / row["batch"]
            if key not in best or per_token < best[key][1]:
                best[key] = (row["context"], per_token, f"{row['kernel']}, {row.get('attention', '?')}")
    return best


def prefill_costs(path: Path, shape: str, prefill_path: str) -> dict[str, float]:
    """Seconds per prefilled token of bf16 and of 2-bit through `prefill_path`, at the longest prompt measured."""
    report = benchmark_record(path, "prefill.py", "prefill", dict, shape)
    entries = list(report["prefill"].values())
    tokens = max(entry["tokens"] for entry in entries)
    found = {("fp16" if e["precision"] == "bf16" else "2bit"): e["per_token"] for e in entries
             if e["tokens"] == tokens and (e["precision"] == "bf16" or e["path"] == prefill_path)}
    if set(found) != {"fp16", "2bit"}:
        sys.exit(f"{path}: no bf16 and 2-bit {prefill_path} prefill at {tokens} tokens")
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("comparison", type=Path)
    parser.add_argument("costs", type=Path, help="a benchmarks/decode.py JSON")
    parser.add_argument("--shapes", nargs="+", default=["qwen3-8b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 1])
    parser.add_argument("--budget", type=int, required=True, help="the comparison's token budget")
    parser.add_argument("--prompt-max", type=int, default=512, help="longest prompt in tokens (at most)")
    parser.add_argument("--steps", type=Path, nargs="+", help="benchmarks/decode_step.py JSONs whose fastest steps "
                        "replace the decode costs at the batches they measured (each batch's pair from one file)")
    parser.add_argument("--leave-out", nargs="+", default=[], metavar="TEXT",
                        help="--steps rows whose kernel names contain TEXT are not priced (e.g. 'sums in torch', "
                        "a path the rescue does not take by default)")
    parser.add_argument("--prefill", type=Path, help="a benchmarks/prefill.py JSON whose prefill costs per token "
                        "replace the decode.py file's")
    parser.add_argument("--prefill-path", default="dequantize", help="the 2-bit prefill path of --prefill to use")
    args = parser.parse_args()
    summaries = method_summaries(args.comparison)
    lines = [f"Projection of {args.comparison} to per-token costs of {args.costs}", "",
             "| shape | batch | method | accuracy | 2-bit tokens | FP16 tokens | projected s (x FP16) "
             "| decode only s (x FP16) |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for shape in args.shapes:
        steps = fastest_steps_of(args.steps, shape, tuple(args.leave_out)) if args.steps else {}
        prefill = prefill_costs(args.prefill, shape, args.prefill_path) if args.prefill else {}
        for batch in args.batches:
            costs = load_projection(args.costs, shape, batch)
            for precision, name in (("fp16", "bf16"), ("2bit", "2bit")):
                if (name, costs.batch) in steps:
                    context, per_token, kernel = steps[name, costs.batch]
                    costs.points[precision], costs.kernels[precision] = [(context, per_token)], kernel
            costs.prefill.update(prefill)
            lowest = min(points[0][0] for points in costs.points.values())
            if args.prompt_max + args.budget / 2 > lowest:
                sys.exit(f"{args.comparison}: a trace's context may reach {args.prompt_max + args.budget / 2:.0f}, "
                         f"past the lowest measured context {lowest}; rerun `rescue compare --costs` instead")
            base = projected_seconds(summaries["fp16"], costs), projected_seconds(summaries["fp16"], costs, False)
            for method, s in summaries.items():
                full, decode = projected_seconds(s, costs), projected_seconds(s, costs, False)
                lines.append(f"| {shape} | {costs.batch} | {method} | {s['accuracy']:.1%} | {s['mean_tokens_2bit']:.0f} "
                             f"| {s['mean_tokens_fp16']:.0f} | {full:.1f} ({full / base[0]:.2f}x) "
                             f"| {decode:.1f} ({decode / base[1]:.2f}x) |")
            d = costs.describe()
            lines.append(f"| {shape} | {costs.batch} | costs | ms/token: 2-bit "
                         f"{d['decode_seconds_per_token']['2bit'][lowest] * 1e3:.3f}, FP16 "
                         f"{d['decode_seconds_per_token']['fp16'][lowest] * 1e3:.3f}; prefill ms/token: 2-bit "
                         f"{costs.prefill['2bit'] * 1e3:.3f}, FP16 {costs.prefill['fp16'] * 1e3:.3f} | | | | |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
