"""Running one method over a list of problems and keeping an evaluation record.

The record has one row per problem (prompt id, generated tokens, finish reason, answer,
correctness, wall time) and a summary; both are written atomically into a run folder.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from inference.config import SamplingConfig
from inference.decoding.generate import Sampler, eos_token_ids, generate
from inference.evaluation.answers import extract_final_answer, split_thinking
from inference.evaluation.grading import is_correct
from inference.evaluation.repetition import has_loop
from inference.prompts import Problem, render_prompt
from inference.storage import folder_written_atomically


@dataclass
class ProblemRecord:
    """One problem's outcome under one method. `wall_seconds` is the problem's share of its batch's time;
    `loop` is the naive repetition check of `inference.evaluation.repetition.has_loop` on the generated text."""

    problem_id: str
    method: str
    sample: int
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    closed_think: bool
    loop: bool
    answer: str | None
    gold: str
    correct: bool
    wall_seconds: float
    text: str
    tokens_2bit: int = 0
    """Tokens the 2-bit model generated for this trace (dropped and cut ones included)."""
    tokens_fp16: int = 0
    tokens_forced: int = 0
    """Tokens the controller wrote itself (a commit's closing text)."""
    prefill_2bit: int = 0
    """Tokens the 2-bit model prefilled (the prompt, then at every resumption what its kept cache lacks, or the
    whole trace so far without `rescue.round_cache`)."""
    prefill_fp16: int = 0
    passes_2bit: int = 0
    """Prefill passes of the 2-bit model (one per batch the trace joined: each reads its weights once)."""
    passes_fp16: int = 0
    checks_fp16: int = 0
    """FP16 forward passes that checked an arithmetic step's result (each reads the FP16 weights once)."""
    actions: list = field(default_factory=list)
    """Controller actions: {kind: plan|commit|fallback|handback|probe_dropped, position, ...}."""



def run_method(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    method: str,
    sampling: SamplingConfig,
    progress: bool = True,
) -> list[ProblemRecord]:
    """Generate one trace per problem with `model` and grade its final answer."""
    device = next(model.parameters()).device
    precision = "fp16" if method == "fp16" else "2bit"
    sampler = Sampler(sampling.temperature, sampling.top_k, sampling.top_p)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    stop_ids = eos_token_ids(tokenizer, model)
    records: list[ProblemRecord] = []
    # The budget is checked against the model's context and the batch sized from free GPU memory before
    # any generation (inference/decoding/memory.py); the bar shows the batch chosen.
    from inference.decoding.memory import available_bytes, check_context, plan_batch

    prompt_lengths = [len(ids) for ids in tokenizer([render_prompt(tokenizer, p.question) for p in problems]).input_ids]
    longest = max(prompt_lengths, default=0)
    check_context(model.config, longest, sampling.budget, getattr(model.config, "_name_or_path", None) or "the model")
    plan = plan_batch(model.config, len(problems), sampling.batch_size, longest, sampling.budget,
                      model.get_input_embeddings().weight.dtype, available_bytes(device))
    bar = tqdm(total=len(problems), desc=method, unit="problem", disable=not progress, dynamic_ncols=True,
               postfix={"batch": plan.describe()})
    generated_total = 0
    for start in range(0, len(problems), plan.batch):
        batch = problems[start : start + plan.batch]
        prompts = [render_prompt(tokenizer, p.question) for p in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
        began = time.perf_counter()
        result = generate(
            model,
            encoded.input_ids,
            encoded.attention_mask,
            max_new_tokens=sampling.budget,
            eos_token_ids=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            sampler=sampler,
            decode=sampling.decode,
            generator=generator,
        )
        share = (time.perf_counter() - began) / len(batch)
        for problem, ids, reason, prompt_len in zip(batch, result.generated_ids, result.finish_reasons, result.prompt_lengths):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            answer = extract_final_answer(text)
            records.append(
                ProblemRecord(
                    problem_id=problem.id,
                    method=method,
                    sample=0,
                    prompt_tokens=int(prompt_len),
                    generated_tokens=len(ids),
                    finish_reason=reason,
                    closed_think=split_thinking(text)[2],
                    loop=has_loop(text),
                    answer=answer,
                    gold=problem.answer,
                    correct=is_correct(answer, problem.answer),
                    wall_seconds=round(share, 4),
                    text=text,
                    **{f"tokens_{precision}": len(ids), f"prefill_{precision}": int(prompt_len),
                       f"passes_{precision}": 1},
                )
            )
            generated_total += len(ids)
        bar.update(len(batch))
        elapsed = bar.format_dict["elapsed"] or 1e-9
        accuracy = sum(r.correct for r in records) / len(records)
        bar.set_postfix(batch=plan.describe(), tok_s=f"{generated_total / elapsed:.0f}", acc=f"{accuracy:.2f}")
    bar.close()
    return records


def run_controlled(models: dict, tokenizer, problems: Sequence[Problem], *, method: str, trigger,
                   sampling: SamplingConfig, control, progress: bool = True) -> list[ProblemRecord]:
    """One trace per problem under the rescue controller (`inference.control.controller`), graded."""
    from inference.control.controller import Controller

    controller = Controller(models, tokenizer, trigger, control, sampling, method)
    states = controller.run(problems, progress=progress)
    records = []
    for state in states:
        text = tokenizer.decode(state.generated, skip_special_tokens=True)
        answer = extract_final_answer(text)
        problem = state.problem
        records.append(ProblemRecord(
            problem_id=problem.id, method=method, sample=0, prompt_tokens=len(state.prompt_ids),
            generated_tokens=len(state.generated), finish_reason=state.finish_reason,
            closed_think=split_thinking(text)[2], loop=has_loop(text), answer=answer, gold=problem.answer,
            correct=is_correct(answer, problem.answer), wall_seconds=round(state.wall_seconds, 4), text=text,
            tokens_2bit=state.tokens["2bit"], tokens_fp16=state.tokens["fp16"], tokens_forced=state.tokens["forced"],
            prefill_2bit=state.prefill["2bit"], prefill_fp16=state.prefill["fp16"], checks_fp16=state.checks,
            passes_2bit=state.passes["2bit"], passes_fp16=state.passes["fp16"],
            actions=state.actions,
        ))
    return records


def wilson_interval(successes: int, count: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (stays inside [0, 1] for small counts and extremes)."""
    if count == 0:
        return 0.0, 0.0
    p = successes / count
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z * (p * (1 - p) / count + z * z / (4 * count * count)) ** 0.5 / (1 + z * z / count)
    # At p = 0 or 1 the bound equals p in exact arithmetic; rounding can put it a hair on the wrong side.
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def summarize(records: Sequence[ProblemRecord]) -> dict:
    """Accuracy, generated-token statistics, finish-reason counts and failure shares of one method's records.

    Shares are fractions of the records: `budget_share` hit the token budget, `unclosed_share` never
    closed `</think>`, `loop_share` tripped the naive repetition check, `loop_or_no_commit_share`
    looped, left `</think>` unclosed or gave no parseable final answer. `p90_generated_tokens` is the
    90th percentile (linear interpolation between order statistics).
    """
    tokens = [r.generated_tokens for r in records]
    count = len(records)

    def share(flags) -> float:
        return sum(flags) / count if count else 0.0

    low, high = wilson_interval(sum(r.correct for r in records), count)
    by_precision = {}
    for name in ("tokens_2bit", "tokens_fp16", "tokens_forced", "prefill_2bit", "prefill_fp16", "checks_fp16",
                 "passes_2bit", "passes_fp16"):
        values = [getattr(r, name) for r in records]
        by_precision[f"mean_{name}"] = statistics.fmean(values) if values else 0.0
        by_precision[f"p90_{name}"] = _percentile(values, 0.9)
    actions = Counter(a["kind"] for r in records for a in r.actions)
    return {
        "method": records[0].method if records else None,
        "problems": count,
        "accuracy": share(r.correct for r in records),
        "accuracy_ci95": [low, high],
        **by_precision,
        "actions": dict(actions),
        "traces_with_actions": sum(1 for r in records if any(a["kind"] != "probe_dropped" for a in r.actions)),
        "mean_generated_tokens": statistics.fmean(tokens) if tokens else 0.0,
        "median_generated_tokens": statistics.median(tokens) if tokens else 0.0,
        "p90_generated_tokens": _percentile(tokens, 0.9),
        "finish_reasons": dict(Counter(r.finish_reason for r in records)),
        "unclosed_think": sum(not r.closed_think for r in records),
        "budget_share": share(r.finish_reason == "budget" for r in records),
        "unclosed_share": share(not r.closed_think for r in records),
        "loop_share": share(r.loop for r in records),
        "loop_or_no_commit_share": share(r.loop or not r.closed_think or r.answer is None for r in records),
        "wall_seconds": round(sum(r.wall_seconds for r in records), 3),
    }


def _percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile of `values`, interpolating linearly between sorted values (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def write_evaluation(out_dir: str | Path, records: Sequence[ProblemRecord], summary: dict) -> Path:
    """Write `records.jsonl` and `summary.json` into `out_dir`, replacing it only once both are complete."""
    out_dir = Path(out_dir)
    with folder_written_atomically(out_dir) as staging:
        with open(staging / "records.jsonl", "w") as handle:
            for record in records:
                handle.write(json.dumps(asdict(record)) + "\n")
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir
