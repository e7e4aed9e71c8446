"""Real-scale rehearsal on one GPU: the Qwen3-0.6B and 8B shapes (random weights, training.rehearsal)
through the pipeline's stages at reasoning budgets, each stage measured.

Stages per shape, each skipped when the time left (`--seconds`) cannot hold it:
- build: the random-weight model and its tokenizer (trained on MATH-500), saved as a folder;
- twin: the 2-bit twin, round to nearest in the published GPTQ layout (v1 zero points); with
  `--gptq-seconds`, GPTQModel's own quantization of the 0.6B shape is timed as well (`quantize`);
- decode: the batch `inference.decoding.memory` chooses at each budget, and tokens/s, peak GPU memory over a
  fixed number of steps with the full static cache and capture buffers of that budget allocated, for
  the bf16 model and the 2-bit twin through the fused kernel;
- linears (`--linear-rows`, CUDA): the seven linears of a decoder layer (the layers in turn, so no weight
  is in L2 twice) at those rows, side by side: bf16 cuBLAS, the fused kernel in tiles of up to 64 rows
  (one call per batch of up to 64) and in tiles of 16 (the kernel before 2026-12-03: four calls at 64
  rows), and at more rows than MAX_DECODE_ROWS each prefill path (`kernels.PREFILL`: GPTQModel's
  dequantizing forward, `gptq forward`, and the project's, `dequantize forward`); the collection then
  runs the faster tile at its batch;
- collect: `rescue collect` of MATH-500 prompts at the budget (hidden states captured): wall time,
  tokens/s, peak memory, bytes per generated token and per trace set;
- label and train: `rescue label` and the detector's fit on that trace set (positions per second);
- collect bf16 (`--collect-bf16`, last): the same prompts (as many as one bf16 batch holds) with the bf16
  model, at the collection budget or, where the time left cannot hold that, at the largest multiple of 512
  steps it can (`bf16_budget`). Both collections record the wall time every 256 decoding steps
  (`step_marks`), so tokens/s are compared over the same steps: the bf16 batch's against the 2-bit
  batch's over its first as many steps.

Random weights never close `</think>` or emit an end of turn, so every row runs to the budget: the
worst case of a real run. Results are written to `<out>/rehearsal.json` after every stage.

    python benchmarks/rehearsal.py --data ../shared/data/math500_test.jsonl --out /tmp/rehearsal
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class Clock:
    """The run's deadline: a stage starts only when its estimate fits in the time left."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def gpu_peak() -> dict:
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2),
            "card_gb": round(total / 1e9, 1),
            "peak_share_of_card": round(torch.cuda.max_memory_reserved() / total, 3)}


def reset_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def write_splits(math500: Path, work: Path, train: int) -> Path:
    """The first `train` MATH-500 rows as a local benchmark file (MATH-500 has one split: test)."""
    rows = [line for line in math500.read_text().splitlines() if line.strip()]
    path = work / f"math500-first{train}.jsonl"
    path.write_text("\n".join(rows[:train]) + "\n")
    return path


def time_decode(model, tokenizer, questions, budget: int, layers, steps: int, batch_size: int,
                warm: int = 16) -> dict:
    """Decode `steps` steps of the batch `plan_batch` allows at `budget` (static cache and capture buffers
    of the full budget allocated) and time the steps after `warm`."""
    from inference.decoding.generate import Sampler, generate
    from inference.decoding.memory import available_bytes, check_context, plan_batch
    from inference.prompts import render_prompt
    from training.collect import HiddenRecorder

    device = next(model.parameters()).device
    prompts = [render_prompt(tokenizer, q) for q in questions[:batch_size]]
    longest = max(len(ids) for ids in tokenizer(prompts).input_ids)
    check_context(model.config, longest, budget)
    dtype = model.get_input_embeddings().weight.dtype
    reset_gpu()
    plan = plan_batch(model.config, len(prompts), batch_size, longest, budget, dtype, available_bytes(device),
                      len(layers), torch.float16)
    encoded = tokenizer(prompts[: plan.batch], return_tensors="pt", padding=True, padding_side="left").to(device)
    recorder = HiddenRecorder(layers, plan.batch, budget, torch.float16)
    marks = {}

    def hook(view):
        recorder(view)
        if view.step in (warm, steps - 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks[view.step] = time.perf_counter()
        if view.step == steps - 1:
            return torch.ones(len(view.rows), dtype=torch.bool, device=device)
        return None

    began = time.perf_counter()
    generate(model, encoded.input_ids, encoded.attention_mask, max_new_tokens=budget, eos_token_ids=[],
             pad_token_id=tokenizer.pad_token_id, sampler=Sampler(0.6, 20, 0.95),
             generator=torch.Generator(device=device).manual_seed(0), layers=layers, hook=hook, top_prob=True,
             stack_dtype=torch.float16, decode="static")
    seconds = marks[steps - 1] - marks[warm]
    result = {"budget": budget, "batch": plan.batch, "batch_limit": plan.limit, "chosen": plan.describe(),
              "row_bytes_estimate": plan.row_bytes, "longest_prompt": longest, "steps_timed": steps - 1 - warm,
              "step_ms": round(1000 * seconds / (steps - 1 - warm), 2),
              "tokens_per_s": round(plan.batch * (steps - 1 - warm) / seconds, 1),
              "wall_s_incl_prefill_and_capture": round(time.perf_counter() - began, 2), **gpu_peak()}
    del recorder
    return result


def rehearse(shape: str, args, clock: Clock, results: dict, save) -> None:
    from inference.config import load_config
    from inference.decoding.attention import use_decode_attention
    from inference.decoding.models import load_full_precision, load_quantized
    from rescue import commands
    from training.rehearsal import build_rehearsal_model, math500_texts, write_gptq_v1_checkpoint

    work = Path(args.out) / shape
    work.mkdir(parents=True, exist_ok=True)
    record = results.setdefault(shape, {"stages": {}})
    stages = record["stages"]

    def stage(name, estimate, function):
        if clock.left() < estimate:
            stages[name] = {"skipped": f"{clock.left():.0f} s left, the stage needs about {estimate:.0f} s"}
            save()
            return None
        reset_gpu()
        began = time.perf_counter()
        try:
            value = function()
            stages[name] = {"wall_s": round(time.perf_counter() - began, 2), **gpu_peak(), **(value or {})}
        except Exception as error:  # a failed stage is a finding; the rest still runs
            stages[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                            "wall_s": round(time.perf_counter() - began, 2),
                            "traceback": traceback.format_exc()[-1500:]}
        save()
        print(json.dumps({shape: {name: stages[name]}}, default=str)[:2000], flush=True)
        return stages[name]

    fp16_dir, twin_dir = work / "model", work / "model-2bit"
    large = shape == "qwen3-8b"
    texts = math500_texts(args.data)
    stage("build", 90 if large else 25, lambda: {**build_rehearsal_model(
        shape, fp16_dir, texts, device="cuda" if torch.cuda.is_available() else "cpu", **args.overrides),
        "folder_bytes": folder_bytes(fp16_dir)})
    if not fp16_dir.is_dir():
        return
    stage("twin (round to nearest, published GPTQ layout)", 60 if large else 15, lambda: {
        **write_gptq_v1_checkpoint(fp16_dir, twin_dir, 64, device="cuda" if torch.cuda.is_available() else "cpu"),
        "folder_bytes": folder_bytes(twin_dir)})

    if args.linear_rows and torch.cuda.is_available():
        stage("linears by tile", 60 if large else 20, lambda: time_linears(twin_dir, args.linear_rows))
        chosen = choose_tile(stages.get("linears by tile") or {}, args.batch_size)
        if chosen is not None:
            from inference.decoding import kernels

            kernels.MAX_ROWS = chosen
            record["collect_tile_rows"] = chosen

    layers = [13, 20, 27] if shape == "qwen3-0.6b" else [17, 26, 35]
    layers = [min(layer, args.overrides.get("num_hidden_layers", 99) - 1) for layer in layers]
    questions = [json.loads(line)["problem"] for line in Path(args.data).read_text().splitlines() if line.strip()]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    for precision in ("bf16", "2bit-fused"):
        def measure(precision=precision):
            if precision == "bf16":
                model, tokenizer = load_full_precision(str(fp16_dir), dtype="bfloat16", device=device)
            else:
                model, tokenizer = load_quantized(str(twin_dir), device, kernel="fused" if device == "cuda" else "gptq",
                                                  bits=2)
            rows = {}
            try:
                for budget in args.decode_budgets:
                    for attention in args.decode_attention:
                        if clock.left() < 20:
                            break
                        # The split-cache kernel is what the loaders set on CUDA; "grouped" is packed SDPA, "hf" HF's.
                        key = str(budget) if attention == "split" else f"{budget} {attention}"
                        use_decode_attention(model, attention)
                        try:
                            rows[key] = time_decode(model, tokenizer, questions, budget, layers, args.decode_steps,
                                                    args.batch_size)
                            rows[key]["attention"] = model.config._attn_implementation
                        except Exception as error:
                            rows[key] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
                        print(json.dumps({shape: {precision: {key: rows[key]}}}), flush=True)
                    use_decode_attention(model, "split")
            finally:
                del model
            return {"budgets": rows}

        if args.decode_budgets:  # none given: straight to collection
            stage(f"decode {precision}", 60 if large else 30, measure)

    if large and not args.collect_large:
        return
    split_file = write_splits(Path(args.data), work, args.collect_prompts)
    overrides = {"model.name": shape, "model.fp16": str(fp16_dir), "model.quantized": str(twin_dir),
                 "model.kernel": "fused" if device == "cuda" else "gptq", "model.device": device,
                 "sampling.decode": "static", "sampling.budget": args.budget, "sampling.batch_size": args.batch_size,
                 "benchmark.name": "math500", "benchmark.path": str(split_file), "capture.shard_size": args.batch_size,
                 "probe.layers": layers, "wandb.mode": "disabled", "output_dir": str(work / "runs"),
                 "detector.max_epochs": args.detector_epochs, "quantization.group_size": 64}
    fused = (stages.get("decode 2bit-fused") or {}).get("budgets", {}).get(str(args.budget), {})
    if device == "cuda" and "error" in fused:  # the fused path failed at this batch: the same traces, plain matmuls
        overrides["model.kernel"] = "dequantized"
        record["collect_kernel_fallback"] = f"dequantized (fused failed: {fused['error']})"
    config = load_config(shape, overrides)
    traces = work / "traces-train"

    def collect():
        summary = commands.collect(config, split="test", limit=args.collect_prompts, out=str(traces))
        manifest = json.loads((traces / "manifest.json").read_text())
        return {"prompts": args.collect_prompts, "budget": args.budget, **summary,
                "trace_set_bytes": folder_bytes(traces), "manifest_shards": len(manifest["shards"])}

    # Every row of a random model runs to the budget: the decode stage's step time says how long that takes.
    step_ms = fused.get("step_ms") if fused.get("batch") else None
    batches = -(-args.collect_prompts // fused["batch"]) if step_ms else 1
    estimate = 1.2 * args.budget * step_ms / 1000 * batches if step_ms else (150 if not large else 300)
    with step_marks() as two_bit_batches:
        collected = stage("collect 2-bit", estimate, collect)
    if collected and "wall_s" in collected and "generated_tokens" in collected:
        collected["tokens_per_s"] = round(collected["generated_tokens"] / collected["wall_s"], 1)
        collected["bytes_per_trace"] = round(collected["stored_bytes"] / max(collected["traces"], 1))
        collected["batches"] = [{"rows": b["rows"], "marks": [[m, round(t - b["marks"][0][1], 3)] for m, t in b["marks"]]}
                                for b in two_bit_batches]
        save()
    if (traces / "manifest.json").is_file():
        train_detector_stages(config, traces, work, stage)
    if args.collect_bf16 and collected and "tokens_per_s" in collected and two_bit_batches:
        collect_bf16_stage(config, fp16_dir, work, args, clock, record, stage, two_bit_batches[0], save)


def collect_bf16_stage(config, fp16_dir: Path, work: Path, args, clock, record: dict, stage, two_bit: dict,
                       save) -> None:
    """The bf16 collection of the 2-bit collection's prompts at the budget the time left holds (module
    docstring), and tokens/s of both over the same decoding steps."""
    from dataclasses import replace

    from rescue import commands

    budget = bf16_budget(two_bit["marks"], args.budget, clock.left())
    if budget == 0:
        record["stages"]["collect bf16 (the same prompts, one batch)"] = {
            "skipped": f"{clock.left():.0f} s left, not enough for 512 steps"}
        save()
        return
    bf16_config = replace(config, sampling=replace(config.sampling, budget=budget))
    bf16_traces = work / "traces-train-bf16"

    def collect_bf16():
        rows = bf16_rows(bf16_config, fp16_dir, args.collect_prompts)
        with step_marks() as batches:
            summary = commands.collect(bf16_config, split="test", limit=rows["prompts"], out=str(bf16_traces),
                                       precision="fp16")
        marks = batches[0]["marks"] if batches else []
        last = budget - 1
        bf16_s, two_bit_s = seconds_to_step(marks, last), seconds_to_step(two_bit["marks"], last)
        same_steps = {"steps": last, "bf16_rows": batches[0]["rows"] if batches else None,
                      "two_bit_rows": two_bit["rows"], "bf16_s": round(bf16_s, 2) if bf16_s else None,
                      "two_bit_s": round(two_bit_s, 2) if two_bit_s else None}
        if bf16_s and two_bit_s:
            same_steps["bf16_tokens_per_s"] = round(same_steps["bf16_rows"] * last / bf16_s, 1)
            same_steps["two_bit_tokens_per_s"] = round(two_bit["rows"] * last / two_bit_s, 1)
            same_steps["two_bit_over_bf16"] = round(same_steps["two_bit_tokens_per_s"]
                                                    / same_steps["bf16_tokens_per_s"], 3)
        return {**rows, "budget": budget, "budget_asked": args.budget, **summary, "same_steps": same_steps}

    against = stage("collect bf16 (the same prompts, one batch)", 0, collect_bf16)
    if against and "generated_tokens" in against:
        against["tokens_per_s"] = round(against["generated_tokens"] / against["wall_s"], 1)
        ratio = against.get("same_steps", {}).get("two_bit_over_bf16")
        if ratio is not None:
            record["collect_2bit_over_bf16_tokens_per_s"] = ratio
        save()


def train_detector_stages(config, traces: Path, work: Path, stage) -> None:
    """`rescue label` on the trace set, timing labels, and the detector's fit (positions per second)."""
    from rescue import commands

    stage("label", 40, lambda: {"rates": commands.label(config, str(traces)).get("rates")})
    if not (traces / "labels.json").is_file():  # the label stage was skipped or failed: nothing to train on
        return
    stage("labels for timing", 5, lambda: timing_labels(traces))

    def train():
        from training.fit import train_detector

        summary = train_detector(config, str(traces), out=str(work / "detector"))
        seen = summary["train_positions"] * max(summary["epochs"], 1)
        return {key: summary.get(key) for key in ("train_positions", "val_positions", "epochs", "fit_seconds")} | {
            "positions_per_s": round(seen / max(summary["fit_seconds"], 1e-9), 1)}

    stage("train detector", 40, train)


TILES = (64, 16)
"""The fused kernel's most rows per call that `time_linears` compares (kernels.MAX_ROWS)."""


MARK_EVERY = 256
"""Decoding steps between two wall-time marks of a collection (`step_marks`)."""


@contextmanager
def step_marks(every: int = MARK_EVERY):
    """While open, every collection batch records (rows, step, seconds) at each `every`-th decoding step
    and at its last, the GPU synchronised first (training.collect's HiddenRecorder is swapped for a
    subclass that does this after recording the step). Yields the list of batches' marks."""
    import training.collect as collect

    original, batches = collect.HiddenRecorder, []

    class Marked(original):
        def __call__(self, view):
            super().__call__(view)
            if view.step == 0:
                batches.append({"rows": self.batch, "marks": []})
            if view.step % every == 0 or view.step == self.budget - 1:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                batches[-1]["marks"].append((view.step, time.perf_counter()))

    collect.HiddenRecorder = Marked
    try:
        yield batches
    finally:
        collect.HiddenRecorder = original


def seconds_to_step(marks: list, step: int) -> float | None:
    """Wall seconds from a batch's first decoding step to `step` (a marked step), or None if not reached."""
    times = dict(marks)
    return times[step] - times[0] if step in times and 0 in times else None


def bf16_budget(marks: list, budget: int, seconds_left: float, overhead: float = 30.0, factor: float = 1.05) -> int:
    """The bf16 collection's budget: `budget` if the 2-bit batch's time to its last step, times `factor`
    (bf16 decodes at most about as slowly), plus `overhead` (loading, prefill) fits `seconds_left`; else the
    largest multiple of 512 steps whose 2-bit time does; 0 if none."""
    if (whole := seconds_to_step(marks, budget - 1)) is not None and factor * whole + overhead <= seconds_left:
        return budget
    fitting = [step for step, _ in marks if step and step % 512 == 0 and step < budget
               and factor * seconds_to_step(marks, step) + overhead <= seconds_left]
    return max(fitting, default=0)


def time_linears(twin_dir: Path, rows_list: list[int]) -> dict:
    """Seconds per decoder layer of its seven linears at each of `rows_list`, per kernel (see the module
    docstring), the largest difference between the two tiles' outputs, and the copy rate for the floor."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from decode import copy_bandwidth
    from decode_step import layer_linears, linears_seconds

    from inference.decoding import kernels
    from inference.decoding.models import load_quantized

    model, _ = load_quantized(str(twin_dir), "cuda", kernel="fused", bits=2)
    saved, saved_prefill = (kernels.MAX_ROWS, kernels.MAX_DECODE_ROWS), kernels.PREFILL
    fused = [layer_linears(layer) for layer in model.model.layers]
    dense = [[torch.nn.Linear(m.in_features, m.out_features, bias=False, device="cuda", dtype=torch.bfloat16)
              for m in layer] for layer in fused]
    weight_bytes = sum(b.numel() * b.element_size() for m in fused[0]
                       for b in (m.gptq.qweight, m.gptq.qzeros, m.gptq.scales))
    bandwidth = copy_bandwidth()
    result = {"copy_bytes_per_s": bandwidth, "layers": len(fused),
              "floor_us": {"2bit": round(1e6 * weight_bytes / bandwidth, 1),
                           "bf16": round(1e6 * sum(2 * m.in_features * m.out_features for m in fused[0]) / bandwidth, 1)},
              "us_per_layer": {}, "tile_max_relative_difference": {}}
    try:
        for rows in rows_list:
            times = result["us_per_layer"].setdefault(str(rows), {})
            times["bf16"] = round(1e6 * linears_seconds(dense, rows) / len(dense), 1)
            x = torch.randn(rows, fused[0][0].in_features, device="cuda", dtype=torch.bfloat16)
            outputs = []
            for tile in TILES:
                kernels.MAX_ROWS, kernels.MAX_DECODE_ROWS = tile, max(saved[1], rows)
                times[f"fused, tiles of {tile}"] = round(1e6 * linears_seconds(fused, rows) / len(fused), 1)
                outputs.append(fused[0][0](x).float())
            result["tile_max_relative_difference"][str(rows)] = float(
                (outputs[0] - outputs[1]).abs().max() / outputs[1].abs().max())
            if rows > saved[1]:  # the decoding path at these rows is the prefill path: time both of them too
                kernels.MAX_DECODE_ROWS = 0
                for path, key in (("gptqmodel", "gptq forward"), ("dequantize", "dequantize forward")):
                    kernels.PREFILL = path
                    try:
                        times[key] = round(1e6 * linears_seconds(fused, rows) / len(fused), 1)
                    except Exception as error:  # a path that fails in a graph is a finding, not the stage's end
                        times[key] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    finally:
        kernels.MAX_ROWS, kernels.MAX_DECODE_ROWS = saved
        kernels.PREFILL = saved_prefill
        del model, fused, dense
    return result


def _nearest(timed: dict, batch: int) -> dict:
    """The linears stage's times at the timed row count nearest `batch` (keys are row counts as strings)."""
    return timed[min(timed, key=lambda rows: abs(int(rows) - batch))]


def choose_tile(timed: dict, batch: int) -> int | None:
    """The tile (kernels.MAX_ROWS) the linears stage found faster at the timed row count nearest `batch`."""
    if not timed.get("us_per_layer"):
        return None
    times = _nearest(timed["us_per_layer"], batch)
    tiles = {tile: times.get(f"fused, tiles of {tile}") for tile in TILES}
    tiles = {tile: us for tile, us in tiles.items() if us is not None}
    return min(tiles, key=tiles.get) if tiles else None


def bf16_rows(config, fp16_dir: Path, prompts: int) -> dict:
    """How many of the first `prompts` test prompts one bf16 batch holds: `plan_batch` for the bf16 model's
    static caches, against the GPU's free memory less its weights (and a 1 GB margin, so that the batch
    `rescue collect` then chooses with the model loaded is not one row short, which would add a second batch
    of that row at the same step count)."""
    from transformers import AutoConfig

    from inference.decoding.memory import available_bytes, plan_batch
    from inference.decoding.models import load_tokenizer
    from training.benchmarks import load_benchmark
    from training.collect import plan_units, prompt_lengths

    problems = load_benchmark(config.benchmark.name, "test", config.benchmark.path, limit=prompts)
    longest = max(prompt_lengths(load_tokenizer(fp16_dir), plan_units(problems, 1)))
    weights = sum(f.stat().st_size for f in fp16_dir.glob("*.safetensors"))
    available = available_bytes(torch.device("cuda")) - weights - 10**9 if torch.cuda.is_available() else None
    plan = plan_batch(AutoConfig.from_pretrained(fp16_dir), len(problems), config.sampling.batch_size, longest,
                      config.sampling.budget, torch.bfloat16, available, len(config.probe.layers),
                      getattr(torch, config.capture.dtype))
    return {"prompts": plan.batch, "of": len(problems), "batch": plan.describe()}


def timing_labels(traces: Path) -> dict:
    """Random weights never loop, commit or answer correctly, and the detector needs both classes of every
    head (positives to fit, healthy traces to calibrate on): for timing its fit, every second trace gets a
    loop onset at its midpoint and every other one is marked committed and correct, and each states one
    answer at a third of its length, right on the correct ones (the token ids and hidden states are untouched)."""
    from training.traces import LABELS

    path = traces / LABELS
    record = json.loads(path.read_text())
    for number, labels in enumerate(record["traces"].values()):
        labels["candidates"] = [[labels["length"] // 3, number % 2 == 1]]  # one stated answer, right on odd traces
        if number % 2 == 0:
            labels.update(loop_onset=labels["length"] // 2, loop_period=16)
        else:
            labels.update(loop_onset=None, loop_period=None, committed=True, fails_to_commit=False,
                          budget_exhausted=False, unclosed_think=False, correct=True)
    path.write_text(json.dumps(record))
    return {"relabelled_for_timing": len(record["traces"]),
            "how": "even traces loop from their midpoint, odd traces committed and correct; each states one "
                   "answer at a third of its length, right on odd traces"}


def time_gptq(shape: str, args, clock: Clock, results: dict, save) -> None:
    """GPTQModel's quantization of the rehearsal model, in a child process stopped at the deadline."""
    work = Path(args.out) / shape
    record = results[shape]["stages"]
    seconds = int(min(args.gptq_seconds, clock.left() - 5))
    if seconds < 30:
        record["quantize (GPTQModel)"] = {"skipped": f"{clock.left():.0f} s left"}
        save()
        return
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from inference.config import QuantizationConfig\n"
            "from inference.prompts import render_prompt\n"
            "from inference.decoding.models import load_tokenizer\n"
            "from inference.decoding.quantize import quantize_model\n"
            "import json, pathlib\n"
            "rows = [json.loads(l) for l in pathlib.Path(%r).read_text().splitlines() if l.strip()][:%d]\n"
            "tok = load_tokenizer(pathlib.Path(%r))\n"
            "texts = [render_prompt(tok, r['problem']) + r['solution'] for r in rows]\n"
            "s = quantize_model(%r, %r, texts, QuantizationConfig(bits=2, group_size=64), device='auto')\n"
            "print('GPTQ_SECONDS', s['seconds'])\n") % (str(REPO), str(args.data), args.gptq_texts, str(work / "model"),
                                                      str(work / "model"), str(work / "model-gptq"))
    began = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds)
        lines = [line for line in done.stdout.splitlines() if line.startswith("GPTQ_SECONDS")]
        record["quantize (GPTQModel)"] = {"calibration_texts": args.gptq_texts, "returncode": done.returncode,
                                          "wall_s": round(time.perf_counter() - began, 1),
                                          "quantize_seconds": float(lines[0].split()[1]) if lines else None,
                                          "stderr_tail": done.stderr[-600:] if done.returncode else ""}
    except subprocess.TimeoutExpired:
        record["quantize (GPTQModel)"] = {"calibration_texts": args.gptq_texts,
                                          "stopped_after_s": seconds, "finished": False}
    save()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="MATH-500 JSONL (../shared/data/math500_test.jsonl)")
    parser.add_argument("--out", required=True, help="work folder: models, trace sets, detectors")
    parser.add_argument("--results", default=None, help="results JSON, rewritten after every stage "
                                                       "(default <out>/rehearsal.json)")
    parser.add_argument("--shapes", default="qwen3-0.6b,qwen3-8b")
    parser.add_argument("--seconds", type=float, default=540, help="deadline of the whole run")
    parser.add_argument("--budget", type=int, default=8192, help="collection budget")
    parser.add_argument("--batch-size", type=int, default=64, help="most rows per batch (memory may lower it)")
    parser.add_argument("--collect-prompts", type=int, default=64)
    parser.add_argument("--collect-large", action="store_true", help="also collect with the 8B shape")
    parser.add_argument("--collect-bf16", action="store_true",
                        help="after the 2-bit collection, collect the first of its prompts that one bf16 batch holds "
                        "with the bf16 model (tokens/s side by side)")
    parser.add_argument("--decode-budgets", default="8192,32768", help="budgets of the decode stages ('': none)")
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument("--decode-attention", default="split,grouped",
                        help="decode attentions timed side by side: split (the project's split-cache kernel, the "
                        "loaders' choice on CUDA), grouped (packed SDPA), hf (HF's SDPA function)")
    parser.add_argument("--linear-rows", default="", help="rows at which the linears stage times a layer's "
                        "linears, e.g. 16,32,64 ('': no stage; CUDA only)")
    parser.add_argument("--detector-epochs", type=int, default=5)
    parser.add_argument("--gptq-seconds", type=float, default=0, help="time GPTQModel on the 0.6B shape (0: no)")
    parser.add_argument("--gptq-texts", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="shrink the shapes (CPU check of this script)")
    args = parser.parse_args(argv)
    args.decode_budgets = [int(b) for b in args.decode_budgets.split(",") if b.strip()]
    args.decode_attention = [a for a in args.decode_attention.split(",") if a]
    args.linear_rows = [int(r) for r in args.linear_rows.split(",") if r.strip()]
    from inference.decoding.attention import DECODE_ATTENTIONS

    if not set(args.decode_attention) <= set(DECODE_ATTENTIONS):
        parser.error(f"--decode-attention: each must be one of {', '.join(DECODE_ATTENTIONS)}, "
                     f"got {','.join(args.decode_attention)}")
    args.overrides = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=8192) if args.tiny else {})
    clock = Clock(args.seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    results = {"machine": machine, "torch": torch.__version__, "args": {k: v for k, v in vars(args).items()}}

    def save():
        Path(args.results or out / "rehearsal.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    shapes = args.shapes.split(",")
    for shape in shapes:
        rehearse(shape, args, clock, results, save)
    if "qwen3-0.6b" in shapes and args.gptq_seconds > 0:  # last: the stages above matter more
        time_gptq("qwen3-0.6b", args, clock, results, save)
    results["total_s"] = round(time.perf_counter() - clock.start, 1)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
