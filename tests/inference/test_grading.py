import json
import threading
from pathlib import Path

import pytest

from inference.evaluation.answers import extract_final_answer
from inference.evaluation.grading import is_correct

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("1,000", "1000.0"),
        ("$18", "18"),
        ("\\$18.00", "18"),
        ("+5", "5"),
        ("25\\%", "25"),
        ("42.", "42"),
        (" 7 ", "7"),
        ("-0.5", "-.5"),
    ],
)
def test_plain_numbers_compare_as_numbers(predicted, gold):
    assert is_correct(predicted, gold)


@pytest.mark.parametrize(
    "predicted, gold",
    [("17", "18"), ("1000.001", "1000"), ("-5", "5"), ("23", "2,3")],
)
def test_different_numbers_are_wrong(predicted, gold):
    assert not is_correct(predicted, gold)


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("0.5", "\\frac{1}{2}"),
        ("3/4", "\\dfrac{3}{4}"),
        ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
        ("2x + x^2", "x^2+2x"),
        ("[1, 2)", "[1,2)"),
        ("\\text{(C)}", "C"),
        ("$\\frac{1}{2}$", "\\frac12"),
    ],
)
def test_latex_answers_are_compared_mathematically(predicted, gold):
    assert is_correct(predicted, gold)


@pytest.mark.parametrize(
    "predicted, gold",
    [("\\frac{1}{3}", "0.5"), ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("x^2", "2x")],
)
def test_different_latex_answers_are_wrong(predicted, gold):
    assert not is_correct(predicted, gold)


def test_no_answer_is_wrong():
    assert not is_correct(None, "5")


@pytest.mark.parametrize(
    "predicted", ["", "   ", "}}}{{", "\\frac{", "\\boxed{", "$$$", "not an answer at all", "\x00\\left("]
)
def test_garbage_is_wrong_and_never_raises(predicted):
    assert not is_correct(predicted, "5")


def test_grading_works_off_the_main_thread():
    results = []
    worker = threading.Thread(
        target=lambda: results.append((is_correct("0.5", "\\frac{1}{2}"), is_correct("1/3", "0.5")))
    )
    worker.start()
    worker.join(timeout=60)
    assert results == [(True, False)]


def test_gold_math500_solutions_grade_as_correct():
    path = SHARED_DATA / "math500_test.jsonl"
    if not path.is_file():
        pytest.skip(f"benchmark file {path} is absent (shared/data beside the checkout)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    # The reference solution stands in for a model's reply after `</think>`.
    graded = [is_correct(extract_final_answer("</think>" + row["solution"]), row["answer"]) for row in rows]

    # Measured at 500/500 with math-verify 0.9; allow a few for parser changes.
    assert sum(graded) / len(rows) >= 0.99
