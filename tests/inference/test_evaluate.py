import pytest
import torch

from inference.evaluation.evaluate import ProblemRecord, summarize, wilson_interval


def make_record(index: int, *, tokens: int, reason: str = "eos", closed: bool = True, loop: bool = False,
                answer: str | None = "7", gold: str = "7") -> ProblemRecord:
    return ProblemRecord(
        problem_id=f"arith/test/{index:06d}", method="2bit", sample=0, prompt_tokens=100,
        generated_tokens=tokens, finish_reason=reason, closed_think=closed, loop=loop, answer=answer,
        gold=gold, correct=answer == gold, wall_seconds=0.5, text="",
    )


@pytest.fixture
def records() -> list[ProblemRecord]:
    return [
        make_record(0, tokens=100),                                   # healthy, correct
        make_record(1, tokens=200, answer="8"),                       # committed, wrong
        make_record(2, tokens=300, loop=True),                        # loop, still correct
        make_record(3, tokens=400, closed=True, answer=None),         # closed but no parseable answer
        make_record(4, tokens=1024, reason="budget", closed=False, loop=True, answer=None),
    ]


def test_summarize_counts_accuracy_tokens_and_finish_reasons(records):
    summary = summarize(records)
    assert summary["method"] == "2bit"
    assert summary["problems"] == 5
    assert summary["accuracy"] == pytest.approx(2 / 5)
    assert summary["mean_generated_tokens"] == pytest.approx(2024 / 5)
    assert summary["median_generated_tokens"] == 300
    assert summary["finish_reasons"] == {"eos": 4, "budget": 1}
    assert summary["unclosed_think"] == 1
    assert summary["wall_seconds"] == pytest.approx(2.5)


def test_summarize_p90_interpolates_between_sorted_lengths(records):
    # Sorted lengths 100, 200, 300, 400, 1024: the 0.9 quantile sits 60% of the way from 400 to 1024.
    assert summarize(records)["p90_generated_tokens"] == pytest.approx(400 + 0.6 * 624)


def test_summarize_failure_shares(records):
    summary = summarize(records)
    assert summary["budget_share"] == pytest.approx(1 / 5)
    assert summary["unclosed_share"] == pytest.approx(1 / 5)
    assert summary["loop_share"] == pytest.approx(2 / 5)
    # loop (records 2 and 4) or no commit (records 3 and 4): three distinct records.
    assert summary["loop_or_no_commit_share"] == pytest.approx(3 / 5)


def test_summarize_single_record_has_its_length_as_p90():
    assert summarize([make_record(0, tokens=42)])["p90_generated_tokens"] == 42


def test_summarize_no_records_is_all_zero():
    summary = summarize([])
    assert summary["problems"] == 0
    assert summary["accuracy"] == 0.0
    assert summary["p90_generated_tokens"] == 0.0
    assert summary["loop_or_no_commit_share"] == 0.0


def test_wilson_interval_contains_the_share_at_the_extremes():
    """All-correct and all-wrong runs: rounding once put the bound a hair inside the share, which gave a
    negative error bar and crashed the comparison plot (tiny-l, 40 of 40 correct)."""
    for count in range(1, 400):
        for successes in (0, count):
            low, high = wilson_interval(successes, count)
            assert 0.0 <= low <= successes / count <= high <= 1.0
    low, high = wilson_interval(40, 40)
    assert high == 1.0 and 0.9 < low < 1.0
    low, high = wilson_interval(3, 10)
    assert low == pytest.approx(0.1078, abs=1e-4) and high == pytest.approx(0.6032, abs=1e-4)


def test_run_method_sizes_its_batch_from_free_memory_and_refuses_a_budget_past_the_context(
        tiny_model_dir, monkeypatch, capsys):
    import inference.evaluation.evaluate as evaluate
    from inference.config import SamplingConfig
    from inference.errors import ConfigError
    from inference.decoding.memory import row_bytes
    from inference.decoding.models import load_full_precision
    from inference.prompts import Problem

    model, tokenizer = load_full_precision(str(tiny_model_dir), dtype="float32", device="cpu")
    problems = [Problem(f"p{i}", f"What is {i} + 1?", str(i + 1), "arith") for i in range(3)]
    with pytest.raises(ConfigError, match="past the 1024-position context"):
        evaluate.run_method(model, tokenizer, problems, method="fp16", sampling=SamplingConfig(budget=1000))

    longest = max(len(tokenizer(evaluate.render_prompt(tokenizer, p.question)).input_ids) for p in problems)
    one_row = row_bytes(model.config, longest, 8, torch.float32)
    monkeypatch.setattr("inference.decoding.memory.available_bytes", lambda device: int(1.5 * one_row))
    batches = []
    real_generate = evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda model, ids, *a, **k: batches.append(len(ids)) or
                        real_generate(model, ids, *a, **k))
    records = evaluate.run_method(model, tokenizer, problems, method="fp16",
                                  sampling=SamplingConfig(budget=8, batch_size=8, temperature=0.0))
    assert len(records) == 3 and batches == [1, 1, 1]
    assert "batch=1 (memory:" in capsys.readouterr().err
