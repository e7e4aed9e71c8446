"""Traces that another harness generated (a vLLM or lighteval run saved as JSONL), read as text.

Each line is one JSON object with the trace text, and optionally the prompt, the gold answer, the
finish reason and the harness's own correctness verdict; `TextFields` names the fields. Such traces
carry no token ids and no hidden states: they are tokenized again with the model's tokenizer (the
real Qwen3 tokenizer when the user has it) and get every text-level label of `training.labels`,
never the probe's hidden-state targets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.errors import RescueError

# The decoding loop's finish reasons (`inference.decoding.generate`, spelled out so that reading the
# command line does not import torch) and the ones harnesses write, mapped to them.
FINISH_EOS, FINISH_BUDGET = "eos", "budget"
FINISH_REASONS = {"eos": FINISH_EOS, "stop": FINISH_EOS, "budget": FINISH_BUDGET, "length": FINISH_BUDGET,
                  "max_tokens": FINISH_BUDGET, "forced": "forced"}


class TextsError(RescueError):
    """A JSONL file of foreign traces is missing, malformed, or lacks a field it was asked for."""


@dataclass(frozen=True)
class TextFields:
    """Which JSON field holds what (a field named "" is not read)."""

    text: str = "text"
    """the generated trace (the thinking and what follows `</think>`)"""
    id: str = "id"
    """a trace id; the line number when the row has none"""
    gold: str = "gold"
    """the reference answer, graded against the trace's final answer as `rescue evaluate` grades"""
    correct: str = ""
    """the harness's own verdict (true/false), used where a row has no gold answer"""
    finish_reason: str = "finish_reason"
    """eos/stop or budget/length; where a row has none it is inferred (see `read_texts`)"""
    prompt: str = "prompt"
    """the problem as posed (kept for reports; not needed for labels)"""


@dataclass(frozen=True)
class ForeignTrace:
    """One trace of a JSONL file; `finish_inferred` says the finish reason was not in the file."""

    id: str
    text: str
    gold: str | None
    correct: bool | None
    finish_reason: str
    finish_inferred: bool
    prompt: str | None


def read_texts(path: str | Path, fields: TextFields = TextFields()) -> list[ForeignTrace]:
    """Every trace of a JSONL file, checked: each row needs a string `text`, and a gold answer or
    (with `fields.correct`) a true/false/null verdict. A row without a finish reason is taken to have
    run out of budget when `</think>` never came (a harness stops such a trace at its token limit)
    and to have ended at EOS otherwise."""
    source = Path(path)
    if not source.is_file():
        raise TextsError(f"{path}: file not found (expected JSONL, one trace per line)")
    traces, seen = [], set()
    with source.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise TextsError(f"{where}: not a JSON object ({error.msg})") from None
            if not isinstance(row, dict):
                raise TextsError(f"{where}: expected a JSON object, got {type(row).__name__}")
            traces.append(_trace(row, where, number, fields))
            if traces[-1].id in seen:
                raise TextsError(f"{where}: field {fields.id!r} repeats the id {traces[-1].id!r}")
            seen.add(traces[-1].id)
    if not traces:
        raise TextsError(f"{path}: holds no traces")
    return traces


def _trace(row: dict[str, Any], where: str, number: int, fields: TextFields) -> ForeignTrace:
    text = row.get(fields.text)
    if not isinstance(text, str):
        found = "missing" if fields.text not in row else f"a {type(text).__name__}"
        raise TextsError(f"{where}: field {fields.text!r} must hold the trace text (a string), got {found} "
                         f"(set --text-field)")
    gold = row.get(fields.gold) if fields.gold else None
    if gold is not None and not isinstance(gold, (str, int, float)):
        raise TextsError(f"{where}: field {fields.gold!r} must be a string or number, got {type(gold).__name__}")
    correct = None
    if fields.correct and (gold is None or fields.correct in row):
        if fields.correct not in row or row[fields.correct] not in (True, False, None):
            raise TextsError(f"{where}: field {fields.correct!r} must be true, false or null (the row has no gold "
                             f"answer), got {'nothing' if fields.correct not in row else repr(row[fields.correct])}")
        correct = row[fields.correct]
    elif gold is None:
        raise TextsError(f"{where}: field {fields.gold!r} (the gold answer) is missing; set --gold-field, or "
                         f"--correct-field to take correctness from the file")
    finish = row.get(fields.finish_reason) if fields.finish_reason else None
    if finish is None:
        from inference.evaluation.answers import split_thinking

        _, _, closed = split_thinking(text)
        finish, inferred = (FINISH_EOS if closed else FINISH_BUDGET), True
    elif str(finish) in FINISH_REASONS:
        finish, inferred = FINISH_REASONS[str(finish)], False
    else:
        raise TextsError(f"{where}: field {fields.finish_reason!r} must be one of "
                         f"{', '.join(sorted(FINISH_REASONS))}, got {finish!r}")
    trace_id = row.get(fields.id) if fields.id else None
    prompt = row.get(fields.prompt) if fields.prompt else None
    return ForeignTrace(id=str(number if trace_id is None else trace_id), text=text,
                        gold=None if gold is None else str(gold), correct=correct, finish_reason=finish,
                        finish_inferred=inferred, prompt=prompt if isinstance(prompt, str) else None)


def load_text_tokenizer(ref: str):
    """The tokenizer of a folder (a model's, or one saved on its own) or of a Hugging Face id that
    is in the local cache (or downloadable where the hub is reachable)."""
    from transformers import AutoTokenizer

    path = Path(ref).expanduser()
    if ref.startswith((".", "/", "~")) and not path.is_dir():
        raise TextsError(f"tokenizer folder {ref} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else ref)
    except Exception as error:
        raise TextsError(f"--tokenizer {ref}: no usable tokenizer there ({type(error).__name__})") from None


@dataclass
class LabeledText:
    """A foreign trace tokenized and labeled: `ids` are its tokens (EOS appended where it ended at
    EOS), `text` their decoding and `token_ends` each token's end offset in it."""

    trace: ForeignTrace
    ids: list[int]
    text: str
    token_ends: list[int]
    labels: Any


def label_texts(traces: list[ForeignTrace], tokenizer, params) -> list[LabeledText]:
    """Every text-level label of each trace (`training.labels.label_trace`). Correctness is graded
    against the gold answer where a row has one, else it is the harness's verdict (null counts as
    not correct)."""
    from dataclasses import replace

    from training.labels import label_trace, token_char_ends

    labeled = []
    for trace in traces:
        ids = tokenizer.encode(trace.text, add_special_tokens=False)
        if trace.finish_reason == FINISH_EOS and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ends = token_char_ends(tokenizer, ids)
        labels = label_trace(ids, text, ends, trace.finish_reason, trace.gold or "", params)
        if trace.gold is None:
            labels = replace(labels, correct=bool(trace.correct))
        labeled.append(LabeledText(trace, ids, text, ends, labels))
    return labeled


def add_text_flags(parser) -> None:
    """`--texts`, `--tokenizer` and one `--<name>-field` option per `TextFields` field (argparse)."""
    from dataclasses import fields

    parser.add_argument("--texts", default=None,
                        help="JSONL of traces another harness generated (one object per line), instead of a trace set")
    parser.add_argument("--tokenizer", default=None,
                        help="--texts: tokenizer folder or Hugging Face id (default: the config's model.fp16)")
    for item in fields(TextFields):
        doc = {"text": "the trace text", "id": "the trace id", "gold": "the gold answer",
               "correct": "the harness's true/false verdict, used where a row has no gold answer ('' = none)",
               "finish_reason": "eos/stop or budget/length (inferred where absent)",
               "prompt": "the problem"}[item.name]
        parser.add_argument(f"--{item.name.replace('_', '-')}-field", dest=f"{item.name}_field", default=item.default,
                            help=f"--texts: field holding {doc} (default: {item.default!r})")


def text_fields(args) -> TextFields:
    """The `TextFields` that `add_text_flags`' options name."""
    from dataclasses import fields

    return TextFields(**{item.name: getattr(args, f"{item.name}_field") for item in fields(TextFields)})
