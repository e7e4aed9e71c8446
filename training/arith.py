"""The embedded family's synthetic reasoning task: left-to-right arithmetic chains with `<think>` traces.

A problem is a start value and 3-8 operations applied strictly in the order given ("Start with 17.
Add 8, multiply by 3, subtract 5. What is the result?" is ((17 + 8) * 3) - 5 = 70, not 17 + 24 - 5),
with every intermediate value kept in a bounded range so numbers stay a few characters long.

The traces imitate a reasoning model's, because a model trained on rigid traces (plan, one line
per step, answer) only makes arithmetic errors when quantized to 2 bits: its traces neither grow
nor loop (DESIGN.md, "What is measured so far"). The failures this project rescues need the
ingredients of real reasoning traces, and the default style is the "verify-until-agree" recipe
that produced them:

- slips corrected on the next line ("Wait, 25 * 3 is not 65, it is 75."),
- re-checks of one earlier step ("Wait, let me check 17 + 8. 17 + 8 = 25. Yes."), a geometric
  number of them,
- verification passes that redo the whole chain, whose *stopping* depends on their content:
  passes continue until two consecutive results agree (the chain's own result counts as the
  first), and a pass may carry an uncorrected slip in its last step, so passes can disagree and
  another one is needed. A 2-bit model's noise makes its passes disagree, and it keeps verifying.

The trace always commits to the gold answer: every slip is either corrected on the next line or
sits in the last step of a pass that is followed by disagreeing passes, and two consecutive passes
agree only on the correct result. Re-checks and verification passes repeat earlier lines on
purpose: that repetition is legitimate, and loop labels and triggers must tell it from a loop.

Splits are disjoint by construction: a problem's split is a hash of its question text, and each
split draws problems by rejection, so no question can be in two splits, whatever the seed or spec.
Problem `i` of a split depends only on (split, i, seed, spec).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from inference.prompts import Problem, render_prompt
from training.tokenizer import IM_END, THINK_CLOSE, THINK_OPEN

if TYPE_CHECKING:
    import datasets

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_SIZES = {"train": 20000, "val": 500, "test": 500}
# Share of the problem space (by question hash, out of 100) owned by each split.
SPLIT_SHARES = {"train": 80, "val": 10, "test": 10}

OPERATION_WORDS = {"+": "add", "-": "subtract", "*": "multiply by"}


@dataclass(frozen=True)
class TraceStyle:
    """How reasoning-like the traces are; the defaults are the verify-until-agree recipe.

    All rates zero gives the rigid style (plan, one line per step, answer).
    """

    slip_rate: float = 0.06
    """Chance that a chain step is first written wrong and corrected on the next line."""
    recheck_rate: float = 0.25
    """Chance of each further re-check of an earlier step (their number is geometric)."""
    max_rechecks: int = 3
    verify_rate: float = 0.5
    """Chance that the chain is followed by verification passes at all."""
    final_slip_rate: float = 0.2
    """Chance that a pass (or a chain about to be verified) carries an uncorrected slip in its
    last step, so the next pass disagrees with it."""
    max_verification_passes: int = 4
    """Slips stop being drawn when the passes needed to agree again would exceed this."""
    max_trace_chars: int = 750
    """A longer trace is redrawn, so prompt and trace fit a 1024-token context."""
    close_slips: bool = False
    """Uncorrected slips (the ones verification passes must catch) are off by one only, so an
    agreeing and a disagreeing pass differ in one digit of their result."""
    verify_steps: int = 0
    """Steps a verification pass restates: 0 for the whole chain; n for its last n steps only, which
    makes passes short and alike, so more of them fit in `max_trace_chars`."""

    def __post_init__(self) -> None:
        for name in ("slip_rate", "recheck_rate", "verify_rate", "final_slip_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"TraceStyle.{name} must be in [0, 1), got {rate}")
        if self.verify_steps < 0:
            raise ValueError(f"TraceStyle.verify_steps must be 0 (the whole chain) or more, got {self.verify_steps}")
        if self.max_verification_passes < 1:
            raise ValueError(
                f"TraceStyle.max_verification_passes must be at least 1, got {self.max_verification_passes}"
            )


@dataclass(frozen=True)
class ArithSpec:
    """Difficulty of the problems and the style of their traces."""

    min_steps: int = 3
    max_steps: int = 8
    start_range: tuple[int, int] = (1, 50)
    """Start value, inclusive."""
    addend_range: tuple[int, int] = (1, 50)
    """Operand of "add" and "subtract", inclusive."""
    multiplier_range: tuple[int, int] = (2, 9)
    """Operand of "multiply by", inclusive."""
    operations: tuple[str, ...] = ("+", "-", "*")
    value_bound: int = 999
    """Every intermediate value v keeps |v| <= value_bound; operands are resampled to ensure it."""
    trace: TraceStyle = field(default_factory=TraceStyle)

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"ArithSpec needs 1 <= min_steps <= max_steps, got {self.min_steps} and {self.max_steps}"
            )
        unknown = [op for op in self.operations if op not in OPERATION_WORDS]
        if not self.operations or unknown:
            raise ValueError(
                f"ArithSpec.operations must be a non-empty subset of + - *, got {self.operations}"
            )
        for name in ("start_range", "addend_range", "multiplier_range"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"ArithSpec.{name} must be (low, high) with low <= high, got {(low, high)}")
        if abs(self.start_range[0]) > self.value_bound or abs(self.start_range[1]) > self.value_bound:
            raise ValueError(f"ArithSpec.start_range {self.start_range} must lie within +-{self.value_bound}")


@dataclass(frozen=True)
class Operation:
    """One instruction of a chain: `op` is "+", "-" or "*"."""

    op: str
    operand: int

    def apply(self, value: int) -> int:
        if self.op == "+":
            return value + self.operand
        if self.op == "-":
            return value - self.operand
        return value * self.operand

    def step_line(self, value: int, result: int) -> str:
        return f"{value} {self.op} {self.operand} = {result}"


@dataclass(frozen=True)
class ArithChain:
    """A start value and the operations applied to it left to right."""

    start: int
    operations: tuple[Operation, ...]

    @property
    def values(self) -> list[int]:
        """The start value and every intermediate result; the last is the answer."""
        values = [self.start]
        for operation in self.operations:
            values.append(operation.apply(values[-1]))
        return values

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def question(self) -> str:
        """The canonical question text; it alone decides the split."""
        instructions = ", ".join(f"{OPERATION_WORDS[o.op]} {o.operand}" for o in self.operations)
        return f"Start with {self.start}. {instructions[0].upper()}{instructions[1:]}. What is the result?"


# The generated benchmarks: one difficulty each, every trace style (a model's training recipe picks
# the style; the benchmark fixes the problems). `arith` is the family's task; the harder ones keep its
# 3-8 steps and widen the numbers, so a larger model has to work near its capacity as tiny-s does on
# `arith` (values up to 4 digits; `arith-xhard` also multiplies by 2-digit numbers).
TASKS: dict[str, ArithSpec] = {
    "arith": ArithSpec(),
    "arith-hard": ArithSpec(start_range=(1, 999), addend_range=(1, 999), value_bound=9999),
    "arith-xhard": ArithSpec(start_range=(1, 999), addend_range=(1, 999), multiplier_range=(2, 19), value_bound=9999),
}


def task_spec(task: str, trace: TraceStyle | None = None) -> ArithSpec:
    """The problems of a generated benchmark, with `trace` as their trace style (default: TraceStyle())."""
    if task not in TASKS:
        raise ValueError(f"unknown arithmetic task {task!r}; known tasks: {', '.join(TASKS)}")
    return dataclasses.replace(TASKS[task], trace=trace or TraceStyle())


def split_of(question: str) -> str:
    """The split that owns a question, from a hash of its text (stable across machines and runs)."""
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 100
    for split in SPLITS:
        if bucket < SPLIT_SHARES[split]:
            return split
        bucket -= SPLIT_SHARES[split]
    raise AssertionError("SPLIT_SHARES must add up to 100")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"arith split must be one of {', '.join(SPLITS)}; got {split!r}")


def _valid_operands(op: str, value: int, spec: ArithSpec) -> tuple[int, int]:
    """The operands of `op` (inclusive, possibly empty) that keep the result within the bound."""
    bound = spec.value_bound
    if op == "+":
        low, high = spec.addend_range
        return max(low, -bound - value), min(high, bound - value)
    if op == "-":
        low, high = spec.addend_range
        return max(low, value - bound), min(high, value + bound)
    low, high = spec.multiplier_range
    if value == 0:
        return low, high
    # |value * k| <= bound for k of either sign; multipliers are usually positive anyway.
    limit = bound // abs(value)
    return max(low, -limit), min(high, limit)


def _interval_open(interval: tuple[int, int]) -> bool:
    return interval[0] <= interval[1]


def _draw_chain(rng: random.Random, spec: ArithSpec) -> ArithChain | None:
    """A random chain, or None when some step has no operation that stays within the bound."""
    value = rng.randint(*spec.start_range)
    start = value
    operations = []
    for _ in range(rng.randint(spec.min_steps, spec.max_steps)):
        op = rng.choice(spec.operations)
        low, high = _valid_operands(op, value, spec)
        if low > high:
            # Resample: another operation that still has operands within the bound, if any.
            open_ops = [o for o in spec.operations if _interval_open(_valid_operands(o, value, spec))]
            if not open_ops:
                return None
            op = rng.choice(open_ops)
            low, high = _valid_operands(op, value, spec)
        operation = Operation(op, rng.randint(low, high))
        operations.append(operation)
        value = operation.apply(value)
    return ArithChain(start, tuple(operations))


def arith_chain(split: str, index: int, seed: int = 0, spec: ArithSpec | None = None) -> ArithChain:
    """Problem `index` of `split`: drawn by rejection until its question hashes into `split`."""
    _check_split(split)
    spec = spec or ArithSpec()
    rng = random.Random(f"arith-problem/{seed}/{split}/{index}")
    for _ in range(10000):
        chain = _draw_chain(rng, spec)
        if chain is not None and split_of(chain.question) == split:
            return chain
    raise ValueError(f"ArithSpec {spec} yields no {split} problem in 10000 draws; widen its ranges")


def _slipped(rng: random.Random, operation: Operation, value: int, avoid: set[int], close: bool = False) -> int:
    """A plausible wrong result for one step: off by one, two or ten, or by one operand too many or few
    (`close`: off by one only)."""
    result = operation.apply(value)
    multiple = abs(value) if operation.op == "*" else operation.operand
    offsets = (1,) if close else (1, 2, 10, multiple)
    candidates = {result + sign * offset for offset in offsets for sign in (1, -1)}
    return rng.choice(sorted(candidates - avoid - {result}))


def _verification_pass(chain: ArithChain, last_result: int, steps: int = 0) -> str:
    values = chain.values
    lines = [o.step_line(v, r) for o, v, r in zip(chain.operations, values, values[1:])]
    lines[-1] = chain.operations[-1].step_line(values[-2], last_result)
    return ", ".join(lines[-steps:] if steps else lines)


def write_trace(chain: ArithChain, rng: random.Random, style: TraceStyle | None = None) -> str:
    """The assistant's completion for one chain: a `<think>` block, then the boxed answer.

    Traces longer than `style.max_trace_chars` are redrawn from the same stream, which trims the
    tail (long chains with many passes) without changing the typical trace.
    """
    style = style or TraceStyle()
    for _ in range(1000):
        trace = _draw_trace(chain, rng, style)
        if len(trace) <= style.max_trace_chars:
            return trace
    raise ValueError(
        f"no trace of {chain.question!r} fits in TraceStyle.max_trace_chars={style.max_trace_chars} "
        "characters in 1000 draws"
    )


def _draw_trace(chain: ArithChain, rng: random.Random, style: TraceStyle) -> str:
    values = chain.values
    answer = chain.answer
    steps = len(chain.operations)
    verifying = rng.random() < style.verify_rate
    # An uncorrected slip needs two more passes to be outvoted (one that disagrees, one that agrees).
    chain_slips_last = (
        verifying and style.max_verification_passes >= 2 and rng.random() < style.final_slip_rate
    )

    rechecks: dict[int, list[int]] = {}
    count = 0
    while count < style.max_rechecks and rng.random() < style.recheck_rate:
        after = rng.randrange(steps)
        rechecks.setdefault(after, []).append(rng.randint(0, after))
        count += 1

    lines = [THINK_OPEN, f"Plan: apply the {steps} operations in order, then check."]
    chain_result = answer
    for index, (operation, value, result) in enumerate(zip(chain.operations, values, values[1:])):
        last = index == steps - 1
        if last and chain_slips_last:
            chain_result = _slipped(rng, operation, value, avoid=set(), close=style.close_slips)
            lines.append(operation.step_line(value, chain_result))
        elif rng.random() < style.slip_rate:
            wrong = _slipped(rng, operation, value, avoid=set())
            lines.append(operation.step_line(value, wrong))
            lines.append(f"Wait, {value} {operation.op} {operation.operand} is not {wrong}, it is {result}.")
        else:
            lines.append(operation.step_line(value, result))
        for checked in rechecks.get(index, []):
            if last and chain_slips_last and checked == index:
                continue  # a re-check would expose the slip that verification is meant to catch
            o, v = chain.operations[checked], values[checked]
            restated = o.step_line(v, values[checked + 1])
            lines.append(f"Wait, let me check {v} {o.op} {o.operand}. {restated}. Yes.")
    lines.append(f"So the result is {chain_result}.")

    if verifying:
        previous = chain_result
        passes = 0
        opening = "Let me verify"
        while True:
            passes += 1
            slip_fits = passes + 2 <= style.max_verification_passes
            if slip_fits and rng.random() < style.final_slip_rate:
                # Differs from the previous result too, so two wrong passes can never agree.
                result = _slipped(rng, chain.operations[-1], values[-2], avoid={previous}, close=style.close_slips)
            else:
                result = answer
            lines.append(f"{opening}: {_verification_pass(chain, result, style.verify_steps)}.")
            if result == previous:
                lines.append(f"That gives {result}, as before.")
                break
            lines.append(f"That gives {result}, not {previous}.")
            previous = result
            opening = "Let me verify again"

    lines.append(THINK_CLOSE)
    return "\n".join(lines) + f"\n\nThe answer is \\boxed{{{answer}}}."


def _trace_rng(split: str, index: int, seed: int) -> random.Random:
    # Separate from the problem's stream, so changing the trace style never changes the problems.
    return random.Random(f"arith-trace/{seed}/{split}/{index}")


def problem_id(split: str, index: int, seed: int = 0, task: str = "arith") -> str:
    """`arith/test/000123`; a non-default seed is part of the id, since it draws other problems."""
    seed_part = f"s{seed}/" if seed else ""
    return f"{task}/{split}/{seed_part}{index:06d}"


def arith_problems(
    split: str, limit: int | None = None, seed: int = 0, spec: ArithSpec | None = None, task: str = "arith"
) -> list[Problem]:
    """The first `limit` problems of a split (default size: DEFAULT_SPLIT_SIZES), for evaluation.

    `task` names the problems (ids and benchmark); without `spec` it also chooses them (TASKS).
    """
    _check_split(split)
    size = DEFAULT_SPLIT_SIZES[split] if limit is None else limit
    spec = spec or task_spec(task)
    problems = []
    for index in range(size):
        chain = arith_chain(split, index, seed, spec)
        trace = write_trace(chain, _trace_rng(split, index, seed), spec.trace)
        problems.append(Problem(problem_id(split, index, seed, task), chain.question, str(chain.answer), task, trace))
    return problems


def arith_dataset(
    split: str, size: int, seed: int = 0, spec: ArithSpec | None = None, task: str = "arith"
) -> datasets.Dataset:
    """The first `size` problems of a split with their traces: columns id, question, answer, trace."""
    import datasets

    _check_split(split)
    spec = spec or task_spec(task)
    columns: dict[str, list[str]] = {"id": [], "question": [], "answer": [], "trace": []}
    for index in range(size):
        chain = arith_chain(split, index, seed, spec)
        columns["id"].append(problem_id(split, index, seed, task))
        columns["question"].append(chain.question)
        columns["answer"].append(str(chain.answer))
        columns["trace"].append(write_trace(chain, _trace_rng(split, index, seed), spec.trace))
    return datasets.Dataset.from_dict(columns)


def render_training_text(tokenizer, question: str, trace: str) -> str:
    """The full chat text a model is trained on: exactly the inference prompt, the trace, `<|im_end|>`."""
    return render_prompt(tokenizer, question) + trace + IM_END
