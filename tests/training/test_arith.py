import dataclasses
import random
import re
import statistics

import pytest

from inference.prompts import render_prompt
from training.arith import (
    DEFAULT_SPLIT_SIZES,
    ArithSpec,
    TraceStyle,
    arith_chain,
    arith_dataset,
    arith_problems,
    render_training_text,
    split_of,
    write_trace,
)
from training.tokenizer import build_tokenizer

STEP = re.compile(r"^(-?\d+) ([-+*]) (-?\d+) = (-?\d+)$")
CORRECTION = re.compile(r"^Wait, (-?\d+) ([-+*]) (-?\d+) is not (-?\d+), it is (-?\d+)\.$")
RECHECK = re.compile(
    r"^Wait, let me check (-?\d+) ([-+*]) (-?\d+)\. (-?\d+) ([-+*]) (-?\d+) = (-?\d+)\. Yes\.$"
)
PASS = re.compile(r"^Let me verify(?: again)?: (.*)\.$")
COMPARISON = re.compile(r"^That gives (-?\d+), (?:as before|not (-?\d+))\.$")
BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def train_traces():
    return arith_dataset("train", 2000)


def apply(left: int, op: str, right: int) -> int:
    return {"+": left + right, "-": left - right, "*": left * right}[op]


def evaluate_question(question: str) -> int:
    """Independent left-to-right reading of "Start with 17. Add 8, multiply by 3. What is the result?"."""
    match = re.fullmatch(r"Start with (-?\d+)\. (.*)\. What is the result\?", question)
    value = int(match.group(1))
    for instruction in match.group(2).split(", "):
        word, operand = re.fullmatch(r"(add|subtract|multiply by) (-?\d+)", instruction.lower()).groups()
        value = apply(value, {"add": "+", "subtract": "-", "multiply by": "*"}[word], int(operand))
    return value


def verification_results(trace: str) -> tuple[int, list[int], list[re.Match]]:
    """The chain's stated result, each pass's result, and each pass's comparison line."""
    lines = trace.splitlines()
    chain_result = int(re.search(r"^So the result is (-?\d+)\.$", trace, re.M).group(1))
    pass_results, comparisons = [], []
    for index, line in enumerate(lines):
        if PASS.match(line):
            pass_results.append(int(STEP.match(PASS.match(line).group(1).split(", ")[-1]).group(4)))
            comparisons.append(COMPARISON.match(lines[index + 1]))
    return chain_result, pass_results, comparisons


def test_problem_depends_only_on_split_index_and_seed():
    short = arith_dataset("val", 20, seed=3)
    long = arith_dataset("val", 60, seed=3)
    assert long.select(range(20)).to_dict() == short.to_dict()
    assert arith_dataset("val", 60, seed=3).to_dict() == long.to_dict()
    assert arith_chain("test", 123) == arith_chain("test", 123)
    assert arith_chain("test", 123, seed=1) != arith_chain("test", 123)


def test_trace_style_never_changes_the_problems():
    rigid = ArithSpec(trace=TraceStyle(slip_rate=0, recheck_rate=0, verify_rate=0, final_slip_rate=0))
    assert arith_dataset("test", 30, spec=rigid)["question"] == arith_dataset("test", 30)["question"]


def test_splits_are_disjoint_by_construction():
    sizes = {"train": 3000, "val": 1500, "test": 1500}
    questions = {split: [arith_chain(split, i).question for i in range(n)] for split, n in sizes.items()}
    for split, split_questions in questions.items():
        assert all(split_of(q) == split for q in split_questions)
    assert not set(questions["train"]) & set(questions["val"])
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["val"]) & set(questions["test"])


def test_problems_have_stable_ids_and_default_sizes():
    problems = arith_problems("test")
    assert len(problems) == DEFAULT_SPLIT_SIZES["test"] == 500
    assert problems[123].id == "arith/test/000123"
    assert problems[123].benchmark == "arith"
    assert len({p.id for p in problems}) == len(problems)
    rows = arith_dataset("test", 10)
    assert [p.question for p in problems[:10]] == rows["question"]
    assert [p.answer for p in problems[:10]] == rows["answer"]
    assert rows["id"] == [p.id for p in problems[:10]]
    assert arith_problems("val", limit=5, seed=2)[4].id == "arith/val/s2/000004"


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="arith split must be one of train, val, test; got 'x'"):
        arith_problems("x")
    with pytest.raises(ValueError, match="got 'dev'"):
        arith_dataset("dev", 3)


def test_chains_respect_the_spec():
    spec = ArithSpec(min_steps=2, max_steps=4, operations=("+", "*"), value_bound=200)
    for index in range(500):
        chain = arith_chain("train", index, spec=spec)
        assert 2 <= len(chain.operations) <= 4
        assert {o.op for o in chain.operations} <= {"+", "*"}
        assert all(abs(v) <= 200 for v in chain.values)
    default = [arith_chain("train", i) for i in range(500)]
    assert all(3 <= len(c.operations) <= 8 and all(abs(v) <= 999 for v in c.values) for c in default)
    assert {o.op for c in default for o in c.operations} == {"+", "-", "*"}


def test_trace_commits_to_the_left_to_right_answer(train_traces):
    for row in train_traces:
        gold = evaluate_question(row["question"])
        assert row["answer"] == str(gold)
        assert row["trace"].startswith("<think>\nPlan: apply the ")
        assert row["trace"].count("</think>") == 1
        assert row["trace"].endswith(f"</think>\n\nThe answer is \\boxed{{{gold}}}.")
        assert BOXED.findall(row["trace"]) == [str(gold)]


def test_every_slip_is_corrected_or_outvoted_by_a_later_pass(train_traces):
    outvoted = 0
    for trace in train_traces["trace"]:
        lines = trace.splitlines()
        chain_result, pass_results, _ = verification_results(trace)
        for index, line in enumerate(lines):
            if step := STEP.match(line):
                left, op, right, result = step.groups()
                correct = apply(int(left), op, int(right))
                if int(result) != correct:
                    correction = CORRECTION.match(lines[index + 1])
                    if correction:
                        assert correction.groups() == (left, op, right, result, str(correct))
                    else:  # left standing only in the chain's last step, then verified away
                        rest = lines[index + 1:lines.index(f"So the result is {result}.")]
                        assert all(RECHECK.match(r).groups()[:3] != (left, op, right) for r in rest)
                        assert pass_results and pass_results[-1] == correct
                        outvoted += 1
            elif recheck := RECHECK.match(line):
                left, op, right, *restated = recheck.groups()
                assert restated == [left, op, right, str(apply(int(left), op, int(right)))]
            elif verification := PASS.match(line):
                steps = [STEP.match(s).groups() for s in verification.group(1).split(", ")]
                for left, op, right, result in steps[:-1]:
                    assert int(result) == apply(int(left), op, int(right))
    assert outvoted > 0


def test_verification_stops_once_two_consecutive_passes_agree(train_traces):
    passes_seen = 0
    for row in train_traces:
        gold = int(row["answer"])
        chain_result, pass_results, comparisons = verification_results(row["trace"])
        if not pass_results:
            assert chain_result == gold
            continue
        passes_seen += 1
        results = [chain_result] + pass_results
        for previous, result, comparison in zip(results, results[1:], comparisons):
            assert int(comparison.group(1)) == result
            if comparison.group(2) is not None:
                assert int(comparison.group(2)) == previous != result
        assert results[-1] == results[-2] == gold
        assert comparisons[-1].group(2) is None  # "as before"
        assert all(c.group(2) is not None for c in comparisons[:-1])
    assert passes_seen > 0


def test_tokenizer_round_trips_traces(tokenizer, train_traces):
    for trace in train_traces["trace"][:300]:
        ids = tokenizer(trace)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == trace
        assert ids[0] == tokenizer.convert_tokens_to_ids("<think>")


def test_training_text_is_the_inference_prompt_then_the_trace(tokenizer, train_traces):
    row = train_traces[0]
    text = render_training_text(tokenizer, row["question"], row["trace"])
    prompt = render_prompt(tokenizer, row["question"])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert text == prompt + row["trace"] + "<|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert ids == (
        tokenizer(prompt)["input_ids"] + tokenizer(row["trace"])["input_ids"] + [tokenizer.eos_token_id]
    )
    assert tokenizer.unk_token_id not in ids


def test_default_traces_have_the_verify_until_agree_statistics(tokenizer, train_traces):
    traces = train_traces["trace"]
    lengths = [len(t) for t in traces]
    assert 150 <= statistics.mean(lengths) <= 350
    passes = [t.count("Let me verify") for t in traces]
    assert max(passes) >= 3
    assert 0.5 <= statistics.mean(passes) <= 1.2
    assert 0.1 <= sum("Wait, let me check" in t for t in traces) / len(traces) <= 0.5
    assert 0.1 <= sum(" is not " in t for t in traces) / len(traces) <= 0.5
    longest = max(range(len(traces)), key=lambda i: len(traces[i]) + len(train_traces[i]["question"]))
    text = render_training_text(tokenizer, train_traces[longest]["question"], traces[longest])
    assert len(tokenizer(text)["input_ids"]) <= 1024


def test_rigid_style_has_no_reasoning_ingredients():
    rigid = TraceStyle(slip_rate=0, recheck_rate=0, verify_rate=0, final_slip_rate=0)
    chain = arith_chain("train", 7)
    trace = write_trace(chain, random.Random(0), rigid)
    assert "Wait" not in trace and "verify" not in trace
    assert len(trace.splitlines()) == len(chain.operations) + 6


def test_generated_benchmarks_are_the_tasks_and_harder_ones_widen_the_numbers():
    from training.arith import TASKS, task_spec
    from training.benchmarks import GENERATED_BENCHMARKS

    assert tuple(TASKS) == GENERATED_BENCHMARKS
    base, hard, xhard = (arith_problems("test", limit=200, task=name) for name in TASKS)
    assert hard[7].id == "arith-hard/test/000007" and hard[7].benchmark == "arith-hard"
    assert {p.question for p in base}.isdisjoint(p.question for p in hard)

    def numbers(problems):
        return [int(n) for p in problems for n in re.findall(r"\d+", p.question + " " + p.answer)]

    assert max(numbers(base)) <= 999 < max(numbers(hard)) <= 9999
    multipliers = [int(m) for p in xhard for m in re.findall(r"[Mm]ultiply by (\d+)", p.question)]
    assert max(multipliers) >= 10 and max(numbers(xhard)) <= 9999
    # The harder tasks keep the split rule: each question hashes into its own split.
    assert all(split_of(p.question) == "test" for p in hard + xhard)
    style = TraceStyle(verify_rate=0.0)
    assert task_spec("arith-hard", style).trace == style and task_spec("arith-hard").value_bound == 9999
    with pytest.raises(ValueError, match="unknown arithmetic task 'arith-x'"):
        task_spec("arith-x")


def test_a_harder_task_s_traces_check_out_step_by_step():
    import operator

    apply = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    for problem in arith_problems("val", limit=100, task="arith-xhard"):
        lines = problem.solution.splitlines()
        steps = [m.groups() for m in map(STEP.match, lines) if m]
        wrong = [s for s in steps if apply[s[1]](int(s[0]), int(s[2])) != int(s[3])]
        corrections = sum(bool(CORRECTION.match(line)) for line in lines)
        assert len(steps) >= 3 and len(wrong) <= corrections + 1  # + a slip that verification outvotes
        assert all(abs(int(s[3])) <= 9999 for s in steps if s not in wrong)
        assert BOXED.search(problem.solution).group(1) == problem.answer


def test_close_slips_make_disagreeing_passes_differ_by_one():
    style = TraceStyle(verify_rate=0.9, final_slip_rate=0.4, max_verification_passes=5, max_trace_chars=2000,
                       close_slips=True)
    wide = dataclasses.replace(style, close_slips=False)
    offsets, wide_offsets = set(), set()
    for index in range(300):
        chain = arith_chain("train", index)
        for target, trace_style in ((offsets, style), (wide_offsets, wide)):
            trace = write_trace(chain, random.Random(index), trace_style)
            if "Let me verify" not in trace:
                continue
            chain_result, pass_results, _ = verification_results(trace)
            target.update(abs(result - chain.answer) for result in [chain_result, *pass_results])
    assert offsets == {0, 1}  # every uncorrected slip is off by one, and some were drawn
    assert len(wide_offsets) > 2  # the default draws wider slips (two, ten, an operand)


def test_verify_steps_restates_only_the_last_steps_in_each_pass():
    style = TraceStyle(verify_rate=0.9, final_slip_rate=0.6, max_verification_passes=12, max_trace_chars=50000,
                       verify_steps=1)
    whole = dataclasses.replace(style, verify_steps=0)
    verified = 0
    for index in range(200):
        chain = arith_chain("train", index)
        short, full = (write_trace(chain, random.Random(index), s).splitlines() for s in (style, whole))
        passes = [PASS.match(line).group(1) for line in short if PASS.match(line)]
        full_passes = [PASS.match(line).group(1) for line in full if PASS.match(line)]
        assert len(passes) == len(full_passes)  # the same draws: only the passes' text differs
        for restated, complete in zip(passes, full_passes):
            assert ", " not in restated and complete.endswith(restated)
            last = chain.operations[-1]
            assert restated.startswith(f"{chain.values[-2]} {last.op} {last.operand} = ")
        verified += bool(passes)
    assert verified > 100
    with pytest.raises(ValueError, match="verify_steps"):
        TraceStyle(verify_steps=-1)
