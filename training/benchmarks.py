"""Benchmark loaders: MATH-500, GSM8K, AIME 2024 and the synthetic arithmetic task, as `Problem`s.

Every stage (collect, evaluate, compare, GPTQ calibration) reads problems through `load_benchmark`,
so a problem has the same id, question and gold answer everywhere. Problems come from a local
JSONL or Parquet file (`path`, the offline way and the way tests use) or from the Hugging Face Hub
through `datasets`. Files are checked row by row, and every problem found is reported as a
`BenchmarkError` with one line naming the file, the row and the field.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.errors import RescueError
from inference.prompts import Problem

HUB_TIMEOUT_S = 5.0


class BenchmarkError(RescueError, ValueError):
    """A benchmark cannot be loaded: unknown name or split, unreadable file, missing field, offline hub."""


class _RowError(Exception):
    """A row lacks what a benchmark needs; the loader adds the file and row number."""

    def __init__(self, field: str, expected: str):
        super().__init__(field, expected)
        self.field = field
        self.expected = expected


def _text_field(row: Mapping[str, Any], field: str) -> str:
    """A required field as non-empty text (numbers, like AIME answers, become their decimal text)."""
    value = row.get(field)
    if value is None:
        raise _RowError(field, "is missing")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _RowError(field, f"must be text or a number, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise _RowError(field, "is empty")
    return text


def _math500_problem(row: Mapping[str, Any], split: str) -> Problem:
    return Problem(
        id=f"math500/{_text_field(row, 'unique_id')}",
        question=_text_field(row, "problem"),
        answer=_text_field(row, "answer"),
        benchmark="math500",
        solution=row.get("solution") or None,
    )


_GSM8K_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def _gsm8k_problem(row: Mapping[str, Any], split: str) -> Problem:
    question = _text_field(row, "question")
    solution = _text_field(row, "answer")
    # The original ends each solution with `#### N`; some redistributions keep only the number.
    gold = solution.rsplit("####", 1)[-1].strip()
    if not _GSM8K_NUMBER.fullmatch(gold):
        raise _RowError("answer", f"must end with '#### <number>', got {solution[-40:]!r}")
    # The id hashes the question so that it survives reordering and reshuffled files.
    digest = hashlib.sha1(question.encode("utf-8")).hexdigest()[:12]
    return Problem(
        id=f"gsm8k/{split}/{digest}",
        question=question,
        answer=gold.replace(",", ""),
        benchmark="gsm8k",
        solution=solution.rsplit("####", 1)[0].strip() or None,
    )


def _aime24_problem(row: Mapping[str, Any], split: str) -> Problem:
    return Problem(
        id=f"aime24/{_text_field(row, 'id')}",
        question=_text_field(row, "problem"),
        answer=_text_field(row, "answer"),
        benchmark="aime24",
    )


@dataclass(frozen=True)
class _BenchmarkSource:
    """Where a benchmark lives on the Hub and how one of its rows becomes a `Problem`."""

    hub_id: str
    hub_config: str | None
    # our split name -> the Hub's split name (AIME 2024 is published as a single "train" split)
    splits: Mapping[str, str]
    to_problem: Callable[[Mapping[str, Any], str], Problem]


_SOURCES: dict[str, _BenchmarkSource] = {
    "math500": _BenchmarkSource("HuggingFaceH4/MATH-500", None, {"test": "test"}, _math500_problem),
    "gsm8k": _BenchmarkSource(
        "openai/gsm8k", "main", {"train": "train", "test": "test"}, _gsm8k_problem
    ),
    "aime24": _BenchmarkSource("HuggingFaceH4/aime_2024", None, {"test": "train"}, _aime24_problem),
}
GENERATED_BENCHMARKS = ("arith", "arith-hard", "arith-xhard")  # training.arith.TASKS
KNOWN_BENCHMARKS = (*_SOURCES, *GENERATED_BENCHMARKS)

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _offline_error(name: str, source: _BenchmarkSource) -> BenchmarkError:
    return BenchmarkError(
        f"benchmark '{name}' (hub id {source.hub_id}) is not available offline; "
        "pass a local JSONL or Parquet file with --benchmark.path"
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _rows_from_file(path: Path):
    """The rows of a local JSONL/JSON or Parquet file, as a `datasets.Dataset`."""
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise BenchmarkError(
            f"{path}: unsupported benchmark file type '{path.suffix}'; expected .jsonl, .json or .parquet"
        )
    if not path.is_file():
        raise BenchmarkError(f"{path}: benchmark file does not exist")
    if path.stat().st_size == 0:
        raise BenchmarkError(f"{path}: benchmark file has no problems (it is empty)")

    from datasets import load_dataset

    try:
        return load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parser errors in several exception types
        line_problem = _jsonl_problem(path) if path.suffix.lower() == ".jsonl" else None
        if line_problem is not None:
            raise BenchmarkError(f"{path}: {line_problem}") from error
        kind = "JSON" if builder == "json" else "Parquet"
        cause = error.__cause__ or error
        raise BenchmarkError(f"{path}: could not be read as {kind} ({_first_line(cause)})") from error


def _jsonl_problem(path: Path) -> str | None:
    """What is wrong with a JSONL file that `datasets` could not read, by line number, if we can tell.

    Arrow reports parse errors by row within a block, which is not a line number users can find.
    """
    any_row = False
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            any_row = True
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {number} is not a JSON object ({error.msg})"
            if not isinstance(value, dict):
                return f"line {number} is not a JSON object (got {type(value).__name__})"
    return None if any_row else "benchmark file has no problems (it is blank)"


def _rows_from_hub(name: str, source: _BenchmarkSource, split: str):
    """The rows of a benchmark split on the Hub; fails at once, not after retries, when offline."""
    offline_values = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub itself reads as set
    offline_vars = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    if any(os.environ.get(var, "").upper() in offline_values for var in offline_vars):
        raise _offline_error(name, source)

    from huggingface_hub import HfApi

    # `datasets` retries an unreachable Hub for tens of seconds; one short request decides first.
    try:
        HfApi().dataset_info(source.hub_id, timeout=HUB_TIMEOUT_S)
    except Exception as error:
        raise _offline_error(name, source) from error

    from datasets import load_dataset

    try:
        return load_dataset(source.hub_id, source.hub_config, split=source.splits[split])
    except Exception as error:
        raise BenchmarkError(
            f"benchmark '{name}' (hub id {source.hub_id}) could not be loaded ({_first_line(error)}); "
            "pass a local JSONL or Parquet file with --benchmark.path"
        ) from error


def _check_name(name: str) -> str:
    key = name.strip().lower()
    if key not in KNOWN_BENCHMARKS:
        raise BenchmarkError(
            f"unknown benchmark '{name}'; known benchmarks: {', '.join(KNOWN_BENCHMARKS)}"
        )
    return key


def _check_split(name: str, split: str) -> None:
    splits = _SOURCES[name].splits
    if split not in splits:
        raise BenchmarkError(
            f"benchmark '{name}' has no split '{split}'; known splits: {', '.join(splits)}"
        )


def load_benchmark(
    name: str, split: str = "test", path: str | None = None, limit: int | None = None
) -> list[Problem]:
    """The problems of one benchmark split, in file order.

    Args:
        name: math500, gsm8k, aime24, or a generated one: arith (the synthetic arithmetic task),
            arith-hard or arith-xhard (the same task with larger numbers).
        split: which split; math500 and aime24 have only "test", gsm8k has "train" and "test".
        path: a local .jsonl/.json or .parquet file with the benchmark's own fields; without it
            the benchmark is fetched from the Hugging Face Hub, which needs a network.
        limit: keep only the first `limit` problems.
    """
    key = _check_name(name)
    if limit is not None and limit <= 0:
        raise BenchmarkError(f"benchmark limit must be a positive number of problems, got {limit}")

    if key in GENERATED_BENCHMARKS:
        if path is not None:
            raise BenchmarkError(
                f"benchmark '{key}' is generated, not read from a file; got --benchmark.path {path}"
            )
        from training.arith import arith_problems

        try:
            problems = arith_problems(split, limit, task=key)
        except ValueError as error:  # an unknown split, reported by the generator
            raise BenchmarkError(f"benchmark '{key}': {_first_line(error)}") from error
        if not problems:
            raise BenchmarkError(f"benchmark '{key}' split '{split}' has no problems")
        return problems

    _check_split(key, split)
    source = _SOURCES[key]
    if path is not None:
        where = str(path)
        rows = _rows_from_file(Path(path))
    else:
        where = f"{source.hub_id} split '{source.splits[split]}'"
        rows = _rows_from_hub(key, source, split)

    problems = []
    for index, row in enumerate(itertools.islice(rows, limit)):
        try:
            problems.append(source.to_problem(row, split))
        except _RowError as error:
            raise BenchmarkError(
                f"{where}: row {index + 1}: field '{error.field}' {error.expected}"
            ) from None
    if not problems:
        raise BenchmarkError(f"{where}: benchmark '{key}' has no problems")
    return problems


def calibration_problems(
    name: str, split: str = "train", path: str | None = None, size: int = 128
) -> list[Problem]:
    """The first `size` problems of a training split, for GPTQ calibration.

    Calibrating on the problems that are later evaluated would leak them into the quantized
    model, so a benchmark without a train split (math500, aime24) is refused.
    """
    key = _check_name(name)
    if size <= 0:
        raise BenchmarkError(f"calibration size must be a positive number of texts, got {size}")
    if key in _SOURCES and "train" not in _SOURCES[key].splits:
        raise BenchmarkError(
            f"benchmark '{key}' has no train split to calibrate on (it has only: "
            f"{', '.join(_SOURCES[key].splits)}); use gsm8k or arith for calibration"
        )
    return load_benchmark(key, split, path, limit=size)
