import json
import time
from pathlib import Path

import pytest

from inference.prompts import Problem
from training.benchmarks import BenchmarkError, calibration_problems, load_benchmark

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"benchmark file {path} is absent (shared/data beside the checkout)")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A car costs $1,200 and a bike $34. Total?", "answer": "1200+34=1234\n#### 1,234"},
    {"question": "Half of 9?", "answer": "9 / 2 = 4.5\n#### 4.5"},
    {"question": "Ten minus twelve?", "answer": "#### -2"},
]

MATH500_ROWS = [
    {"problem": "What is $1+1$?", "answer": "2", "unique_id": "test/algebra/1.json"},
    {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}", "unique_id": "test/algebra/2.json"},
    {"problem": "Find $x$ if $2x=6$.", "answer": "3", "unique_id": "test/algebra/3.json"},
    {"problem": "What is $2^3$?", "answer": "8", "unique_id": "test/algebra/4.json"},
]


@pytest.fixture
def gsm8k_file(tmp_path):
    return write_jsonl(tmp_path / "gsm8k_test.jsonl", GSM8K_ROWS)


@pytest.fixture
def math500_file(tmp_path):
    return write_jsonl(tmp_path / "math500_test.jsonl", MATH500_ROWS)


def test_gsm8k_gold_answer_is_the_number_after_hashes_without_commas(gsm8k_file):
    problems = load_benchmark("gsm8k", split="test", path=str(gsm8k_file))

    assert [p.answer for p in problems] == ["7", "1234", "4.5", "-2"]
    assert all(isinstance(p, Problem) and p.benchmark == "gsm8k" for p in problems)
    assert problems[0].question == GSM8K_ROWS[0]["question"]


def test_gsm8k_ids_hash_the_question_and_survive_reordering(tmp_path, gsm8k_file):
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", list(reversed(GSM8K_ROWS)))

    in_order = {p.question: p.id for p in load_benchmark("gsm8k", path=str(gsm8k_file))}
    reordered = {p.question: p.id for p in load_benchmark("gsm8k", path=str(shuffled))}

    assert in_order == reordered
    assert all(len(i.split("/")[-1]) == 12 and i.startswith("gsm8k/test/") for i in in_order.values())
    assert len(set(in_order.values())) == len(GSM8K_ROWS)


def test_gsm8k_id_names_the_split(gsm8k_file):
    train_ids = [p.id for p in load_benchmark("gsm8k", split="train", path=str(gsm8k_file))]
    assert all(i.startswith("gsm8k/train/") for i in train_ids)


def test_math500_id_is_prefixed_unique_id(math500_file):
    problems = load_benchmark("math500", path=str(math500_file))

    assert problems[0] == Problem(
        id="math500/test/algebra/1.json", question="What is $1+1$?", answer="2", benchmark="math500"
    )


def test_limit_takes_first_problems_in_file_order(math500_file):
    problems = load_benchmark("math500", path=str(math500_file), limit=2)
    assert [p.id for p in problems] == ["math500/test/algebra/1.json", "math500/test/algebra/2.json"]


def test_limit_larger_than_the_file_gives_every_problem(math500_file):
    assert len(load_benchmark("math500", path=str(math500_file), limit=100)) == 4


def test_parquet_file_loads_like_jsonl(tmp_path, math500_file):
    from datasets import Dataset

    parquet = tmp_path / "math500.parquet"
    Dataset.from_list(MATH500_ROWS).to_parquet(str(parquet))

    assert load_benchmark("math500", path=str(parquet)) == load_benchmark("math500", path=str(math500_file))


def test_aime24_numeric_answers_become_text(tmp_path):
    path = write_jsonl(tmp_path / "aime.jsonl", [{"id": 60, "problem": "Find N.", "answer": 204}])
    assert load_benchmark("aime24", path=str(path)) == [
        Problem(id="aime24/60", question="Find N.", answer="204", benchmark="aime24")
    ]


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(BenchmarkError, match=r"unknown benchmark 'mmlu'.*math500, gsm8k, aime24, arith"):
        load_benchmark("mmlu")


def test_unknown_split_lists_the_known_ones(gsm8k_file):
    with pytest.raises(BenchmarkError, match=r"no split 'validation'.*train, test"):
        load_benchmark("gsm8k", split="validation", path=str(gsm8k_file))


def test_math500_has_only_a_test_split(math500_file):
    with pytest.raises(BenchmarkError, match="benchmark 'math500' has no split 'train'"):
        load_benchmark("math500", split="train", path=str(math500_file))


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_must_be_positive(math500_file, limit):
    with pytest.raises(BenchmarkError, match=f"positive.*got {limit}"):
        load_benchmark("math500", path=str(math500_file), limit=limit)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(BenchmarkError, match="nowhere.jsonl: benchmark file does not exist"):
        load_benchmark("gsm8k", path=str(missing))


def test_unsupported_file_type_says_what_is_expected(tmp_path):
    csv = tmp_path / "gsm8k.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(BenchmarkError, match=r"gsm8k.csv.*expected \.jsonl, \.json or \.parquet"):
        load_benchmark("gsm8k", path=str(csv))


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(row) for row in GSM8K_ROWS[:2]] + ['{"question": "cut off", "answer": ']
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(BenchmarkError, match=r"broken.jsonl: line 3 is not a JSON object"):
        load_benchmark("gsm8k", path=str(path))


def test_row_missing_a_field_names_file_row_and_field(tmp_path):
    rows = [dict(row) for row in MATH500_ROWS]
    del rows[2]["answer"]
    path = write_jsonl(tmp_path / "math500.jsonl", rows)

    with pytest.raises(BenchmarkError) as raised:
        load_benchmark("math500", path=str(path))
    message = str(raised.value)
    assert "math500.jsonl: row 3: field 'answer' is missing" in message
    assert "\n" not in message


def test_field_absent_from_every_row_is_reported_at_row_one(tmp_path):
    rows = [{"problem": r["problem"], "answer": r["answer"]} for r in MATH500_ROWS]
    path = write_jsonl(tmp_path / "no_ids.jsonl", rows)
    with pytest.raises(BenchmarkError, match="row 1: field 'unique_id' is missing"):
        load_benchmark("math500", path=str(path))


def test_gsm8k_answer_without_a_final_number_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "it is seven"}])
    with pytest.raises(BenchmarkError, match=r"g.jsonl: row 1: field 'answer' must end with '#### <number>'"):
        load_benchmark("gsm8k", path=str(path))


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file_has_no_problems(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(BenchmarkError, match="empty.jsonl.*has no problems"):
        load_benchmark("gsm8k", path=str(path))


@pytest.mark.parametrize("variable", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_hub_benchmark_offline_fails_at_once_with_a_hint(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    started = time.monotonic()

    with pytest.raises(BenchmarkError) as raised:
        load_benchmark("gsm8k")

    assert time.monotonic() - started < 1.0
    assert str(raised.value) == (
        "benchmark 'gsm8k' (hub id openai/gsm8k) is not available offline; "
        "pass a local JSONL or Parquet file with --benchmark.path"
    )


def test_unreachable_hub_gives_the_offline_message(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    expected = r"'math500' \(hub id HuggingFaceH4/MATH-500\) is not available offline"
    with pytest.raises(BenchmarkError, match=expected):
        load_benchmark("math500")


def test_calibration_problems_are_the_first_questions(gsm8k_file):
    problems = calibration_problems("gsm8k", split="train", path=str(gsm8k_file), size=3)
    assert [p.question for p in problems] == [row["question"] for row in GSM8K_ROWS[:3]]
    # The worked solution (without the '#### N' line) comes along for calibration.
    assert all(p.solution and "####" not in p.solution for p in problems)


def test_calibration_refuses_a_benchmark_without_train_split(math500_file):
    with pytest.raises(BenchmarkError, match="'math500' has no train split"):
        calibration_problems("math500", path=str(math500_file))


def test_calibration_size_must_be_positive(gsm8k_file):
    with pytest.raises(BenchmarkError, match="calibration size"):
        calibration_problems("gsm8k", path=str(gsm8k_file), size=0)


def test_arith_is_generated_and_takes_no_file(tmp_path):
    with pytest.raises(BenchmarkError, match="'arith' is generated"):
        load_benchmark("arith", path=str(tmp_path / "arith.jsonl"))


def test_arith_delegates_to_the_generator():
    pytest.importorskip("training.arith")
    problems = load_benchmark("arith", split="test", limit=5)

    assert 0 < len(problems) <= 5
    assert all(isinstance(p, Problem) for p in problems)


def test_the_harder_generated_benchmarks_load_by_name_and_take_no_file(tmp_path):
    pytest.importorskip("training.arith")
    problems = load_benchmark("Arith-Hard", split="test", limit=3)
    assert [p.id for p in problems] == [f"arith-hard/test/{i:06d}" for i in range(3)]
    assert calibration_problems("arith-xhard", size=2)[1].id == "arith-xhard/train/000001"
    with pytest.raises(BenchmarkError, match="'arith-xhard' is generated"):
        load_benchmark("arith-xhard", path=str(tmp_path / "x.jsonl"))
    with pytest.raises(BenchmarkError, match="benchmark 'arith-hard'.*'dev'"):
        load_benchmark("arith-hard", split="dev", limit=1)


def test_arith_unknown_split_is_a_benchmark_error():
    pytest.importorskip("training.arith")
    with pytest.raises(BenchmarkError, match="benchmark 'arith'.*'nosuchsplit'"):
        load_benchmark("arith", split="nosuchsplit", limit=1)


def test_real_math500_has_500_problems_with_unique_ids():
    problems = load_benchmark("math500", path=str(shared_file("math500_test.jsonl")))

    assert len(problems) == 500
    assert len({p.id for p in problems}) == 500
    assert all(p.id.startswith("math500/test/") for p in problems)


def test_real_gsm8k_gold_answers_are_numbers_and_ids_unique():
    problems = load_benchmark("gsm8k", path=str(shared_file("gsm8k_test.jsonl")))

    assert len(problems) == 1319
    assert len({p.id for p in problems}) == 1319
    for problem in problems:
        float(problem.answer)


def test_real_aime24_has_30_integer_answers():
    problems = load_benchmark("aime24", path=str(shared_file("aime24_test.jsonl")))

    assert len(problems) == 30
    assert all(0 <= int(p.answer) <= 999 for p in problems)
