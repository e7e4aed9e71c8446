"""Answer extraction from generated reasoning traces.

A trace is Qwen3-style: optional `<think>`, the reasoning, `</think>`, then the reply. Two questions
are asked of it, and both are answered from text alone so that every model and every stage agrees:

- what did the model finally commit to? (`extract_final_answer`, read only after `</think>`: a
  trace that never closes its thinking never committed, whatever it wrote while thinking);
- where, while still thinking, did an answer first become available? (`find_candidate_answers`,
  with character offsets that the labeler maps to token positions for `first_candidate_pos` and
  that the commit action uses to prefer the earliest answer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_LEADING_THINK = re.compile(r"\s*<think>")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
_FINAL_ANSWER_IS = re.compile(
    r"\b(?:the\s+)?(?:final\s+)?answer\s+is\b(?!n't)(?!\s+not\b)[ \t]*:?", re.IGNORECASE
)
_ANSWER_COLON = re.compile(r"\banswer[ \t]*:", re.IGNORECASE)
_RESULT_IS = re.compile(
    r"\bresult\s+is[ \t]*:?[ \t]*\$?[ \t]*([-+]?\d+(?:,\d{3})*(?:\.\d+)?)(?![\d,])", re.IGNORECASE
)
# Where a stated answer ends inside its line: a sentence break, a clause break before a word,
# or a semicolon. A period directly followed by a digit is a decimal point and does not count.
_STATEMENT_END = re.compile(r"[.!?](?=\s|$)|;|,(?=\s+[A-Za-z]{2,})")
# Multiple-choice letters like `C` or `(C)` are the only answers without a digit or LaTeX.
_CHOICE_LETTER = re.compile(r"\(?[A-Ea-e]\)?")


@dataclass(frozen=True)
class CandidateAnswer:
    """An answer stated while thinking: its text and its character span, `text == trace[start:end]`."""

    text: str
    start: int
    end: int


def _thinking_span(text: str) -> tuple[int, int, bool]:
    """Character span (start, end) of the thinking part and whether `</think>` closed it."""
    opening = _LEADING_THINK.match(text)
    start = opening.end() if opening else 0
    close = text.find(THINK_CLOSE, start)
    if close == -1:
        return start, len(text), False
    return start, close, True


def split_thinking(text: str) -> tuple[str, str, bool]:
    """Split a generated trace into (thinking, after, closed).

    Thinking is what lies between an optional leading `<think>` and the first `</think>`; `after` is
    everything past that `</think>`. `closed` says whether `</think>` occurred at all: if not, the
    whole trace is thinking and `after` is empty.
    """
    start, end, closed = _thinking_span(text)
    after = text[end + len(THINK_CLOSE) :] if closed else ""
    return text[start:end], after, closed


def _boxed_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Spans of the contents of every complete `\\boxed{...}` (nested braces balanced) in text[start:end].

    A box cut off before its closing brace (a trace that ran out of budget) is not an answer.
    """
    end = len(text) if end is None else end
    spans = []
    position = start
    while (match := _BOXED.search(text, position, end)) is not None:
        depth = 1
        cursor = match.end()
        while cursor < end and depth:
            if text[cursor] == "\\" and cursor + 1 < end:
                cursor += 2  # an escaped brace such as `\{` does not open or close the box
                continue
            depth += {"{": 1, "}": -1}.get(text[cursor], 0)
            cursor += 1
        if depth:
            position = match.end()
            continue
        spans.append((match.end(), cursor - 1))
        position = cursor
    return spans


def _stated_value_span(text: str, start: int, end: int) -> tuple[int, int]:
    """Span of the value stated from `start` on, within one line: up to where the sentence ends,
    without surrounding `$`, `\\(`/`\\)`, markdown bold or spaces and without a trailing period."""
    line_end = text.find("\n", start, end)
    line_end = end if line_end == -1 else line_end
    stop = _STATEMENT_END.search(text, start, line_end)
    value_end = stop.start() if stop else line_end
    value_start = start
    wrappers = (" ", "\t", "$", "*", "\\(", "\\)", "\\[", "\\]")
    changed = True
    while changed and value_start < value_end:
        changed = False
        for wrapper in wrappers:
            if text.startswith(wrapper, value_start, value_end):
                value_start += len(wrapper)
                changed = True
            if text.endswith(wrapper, value_start, value_end):
                value_end -= len(wrapper)
                changed = True
        if value_start < value_end and text[value_end - 1] == ".":
            value_end -= 1
            changed = True
    return value_start, max(value_start, value_end)


def _stripped(text: str, start: int, end: int) -> tuple[int, int]:
    """The span text[start:end] without surrounding whitespace."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _looks_like_answer(value: str) -> bool:
    """Whether a value stated after "answer is" reads as an answer rather than prose
    ("the answer is 17" versus "the answer is probably wrong")."""
    if not value:
        return False
    return any(ch.isdigit() for ch in value) or "\\" in value or bool(_CHOICE_LETTER.fullmatch(value))


def extract_final_answer(text: str) -> str | None:
    """The answer a trace commits to, read only after `</think>`; None if there is none.

    In order of preference: the last complete `\\boxed{...}` (nested braces allowed, e.g.
    `\\boxed{\\frac{1}{2}}`), else the last GSM8K-style `#### N`, else the last "The answer is X"
    or "the final answer is X" (without a trailing period, `$` or spaces). A trace that never
    closes its thinking has not committed, so the result is None whatever it wrote.
    """
    _, close, closed = _thinking_span(text)
    if not closed:
        return None
    after_start = close + len(THINK_CLOSE)

    boxes = _boxed_spans(text, after_start)
    if boxes:
        box_start, box_end = boxes[-1]
        return text[box_start:box_end].strip()

    hashes = list(_HASH_ANSWER.finditer(text, after_start))
    for match in reversed(hashes):
        value = match.group(1).strip().rstrip(".").strip()
        if value:
            return value

    for match in reversed(list(_FINAL_ANSWER_IS.finditer(text, after_start))):
        value_start, value_end = _stated_value_span(text, match.end(), len(text))
        if value_start < value_end:
            return text[value_start:value_end]
    return None


def find_candidate_answers(text: str) -> list[CandidateAnswer]:
    """Every answer-looking statement inside the thinking part of a trace, sorted by position.

    Counted as a statement of an answer: `\\boxed{X}`, `#### X`, "answer is X" (also "the final
    answer is X"), "answer: X", and "result is N" with N a number. Bare equations ("so x = 5") are
    left out: intermediate steps end that way too, and counting them would put an answer at
    almost every line. Values after "answer is"/"answer:" must contain a digit or LaTeX or be a
    choice letter. Offsets index `text` itself (not the thinking part), and the span covers the
    value alone, so `text[c.start:c.end] == c.text`.
    """
    think_start, think_end, _ = _thinking_span(text)
    boxes = [_stripped(text, start, end) for start, end in _boxed_spans(text, think_start, think_end)]
    spans = [(start, end) for start, end in boxes if start < end]

    for match in _HASH_ANSWER.finditer(text, think_start, think_end):
        value_start, value_end = _stated_value_span(text, match.start(1), think_end)
        if value_start < value_end:
            spans.append((value_start, value_end))

    for anchor in (_FINAL_ANSWER_IS, _ANSWER_COLON):
        for match in anchor.finditer(text, think_start, think_end):
            value_start, value_end = _stated_value_span(text, match.end(), think_end)
            value = text[value_start:value_end]
            # "the answer is \boxed{17}" is already counted through its box.
            if _BOXED.search(value) or any(start <= match.start() <= end for start, end in boxes):
                continue
            if _looks_like_answer(value):
                spans.append((value_start, value_end))

    for match in _RESULT_IS.finditer(text, think_start, think_end):
        spans.append((match.start(1), match.end(1)))

    unique = sorted(set(spans))
    candidates = []
    for start, end in unique:
        # "The final answer is: 17" matches both anchors with the same value; keep one.
        if candidates and candidates[-1].start <= start and end <= candidates[-1].end:
            continue
        candidates.append(CandidateAnswer(text[start:end], start, end))
    return candidates


def token_char_ends(tokenizer, ids: Sequence[int]) -> list[int]:
    """For each generated token, the character offset where it ends in the decoded text.

    The text is `tokenizer.decode(ids, skip_special_tokens=True)`, as collection decodes it, so
    special tokens (EOS) end where the token before them ends. `text[:ends[i]]` is the text of
    `ids[:i + 1]` wherever that prefix decodes to a prefix of the text; a token holding part of a
    multi-byte character ends where the character ends. Offsets never decrease.

    Three ways, the first that reproduces the text wins: one decode per token (character and most
    BPE tokenizers), incremental decoding with a few tokens of context (byte-level pieces, leading
    space rules), decoding every prefix (slow, exact).
    """
    ids = list(ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    distinct = sorted(set(ids))
    piece_of = dict(zip(distinct, tokenizer.batch_decode([[token] for token in distinct], skip_special_tokens=True)))
    pieces = [piece_of[token] for token in ids]
    if "".join(pieces) != text:
        pieces = _incremental_pieces(tokenizer, ids)
    if "".join(pieces) == text:
        ends, offset = [], 0
        for piece in pieces:
            offset += len(piece)
            ends.append(offset)
        return ends
    return _prefix_ends(tokenizer, ids, text)


def _incremental_pieces(tokenizer, ids: list[int], context: int = 6) -> list[str]:
    """Text added by each token, decoding it together with the tokens before it (as streaming
    detokenizers do): a token that leaves an incomplete character adds nothing until the token
    completing it."""
    pieces = []
    prefix_start = read_start = 0
    for index in range(len(ids)):
        before = tokenizer.decode(ids[prefix_start:read_start], skip_special_tokens=True)
        after = tokenizer.decode(ids[prefix_start : index + 1], skip_special_tokens=True)
        if len(after) > len(before) and after.startswith(before) and not after.endswith("\ufffd"):
            pieces.append(after[len(before) :])
            prefix_start = max(0, index + 1 - context)
            read_start = index + 1
        else:
            pieces.append("")
    return pieces


def _prefix_ends(tokenizer, ids: list[int], text: str, chunk: int = 256) -> list[int]:
    ends = []
    for start in range(0, len(ids), chunk):
        prefixes = [ids[: index + 1] for index in range(start, min(len(ids), start + chunk))]
        for decoded in tokenizer.batch_decode(prefixes, skip_special_tokens=True):
            # An incomplete character decodes to U+FFFD; it only counts once completed.
            while decoded.endswith("\ufffd") and not text.startswith(decoded):
                decoded = decoded[:-1]
            ends.append(min(len(decoded), len(text)))
    for index in range(len(ends) - 2, -1, -1):  # never decreasing
        ends[index] = min(ends[index], ends[index + 1])
    return ends
