"""Grading: is a predicted final answer equal to the gold answer?

Plain numbers (GSM8K, AIME, most of MATH) are compared as numbers, which is fast, exact enough and
immune to formatting ("1,000" against "1000.0", "$18" against "18"). Everything else (fractions,
radicals, tuples, intervals, expressions) goes to math-verify, which parses LaTeX into SymPy and
checks mathematical equivalence, so `\\frac{1}{2}` matches `0.5` and `\\dfrac{3}{4}` matches `3/4`.
Grading never raises: an answer that cannot be read is simply not correct.
"""

from __future__ import annotations

import math
import re
import threading

# A plain number as people write final answers: optional sign, thousands separated by commas
# (only in groups of three, so "2,3" stays a pair of numbers), optional decimals.
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+")
_VERIFY_TIMEOUT_S = 5


def _plain_number(answer: str) -> float | None:
    """The value of an answer that is just a number, allowing `$`/`\\$`, `\\%`, spaces and a
    trailing period around it; None if the answer is anything more than that."""
    text = answer.strip()
    for prefix in ("\\$", "$"):
        text = text.removeprefix(prefix).strip()
    for suffix in ("\\%", "%", ".", "\\$", "$"):
        text = text.removesuffix(suffix).strip()
    text = text.replace(" ", "")
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    return float(text.replace(",", "").lstrip("+"))


def _as_latex(answer: str) -> str:
    """The answer as a boxed LaTeX expression, the form math-verify extracts most reliably."""
    text = answer.strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return f"\\boxed{{{text}}}"


def _math_verify_equal(predicted: str, gold: str) -> bool:
    """Mathematical equivalence by math-verify, with its timeout where it can work.

    math-verify bounds parsing and comparison with SIGALRM, which only the main thread may set; in
    any other thread (a DataLoader worker thread, a thread pool) the timeout is switched off.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    timeout_s = _VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(_as_latex(gold), parsing_timeout=timeout_s)
        predicted_parsed = parse(_as_latex(predicted), parsing_timeout=timeout_s)
        if not gold_parsed or not predicted_parsed:
            return False
        return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=timeout_s))
    except (Exception, TimeoutException):
        return False


def is_correct(predicted: str | None, gold: str) -> bool:
    """Whether `predicted` (a final answer, or None where the trace gave none) equals `gold`.

    Both plain numbers: numeric equality with a relative tolerance of 1e-9. Otherwise: math-verify
    equivalence of the two read as LaTeX. Never raises; unreadable input is not correct.
    """
    if predicted is None or not isinstance(predicted, str) or not isinstance(gold, str):
        return False
    if not predicted.strip() or not gold.strip():
        return False
    predicted_number = _plain_number(predicted)
    gold_number = _plain_number(gold)
    if predicted_number is not None and gold_number is not None:
        return math.isclose(predicted_number, gold_number, rel_tol=1e-9)
    return _math_verify_equal(predicted, gold)
