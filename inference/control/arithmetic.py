"""Arithmetic steps written in a reasoning trace, checked from the text alone.

A step is `a op b = c` with integers and `op` one of `+ - *`, closed by a break (`,`, `.` or a
newline), as the embedded models write every step and real models write many. Its result `c` can be
checked against `a op b` without the problem: a step is *wrong* when `c` is not `a op b`. On tiny-s's
2-bit traces almost every trace's first wrong step is wrong this way (the operands were copied right,
the sum or product was not); later steps that copy a wrong value are consistent and count as right,
which is what a rewrite of the first wrong result needs to know.

`find_steps` gives every closed step with the character span of its result; `step_at_end` tells a
decoding trigger, one token at a time, whether the text so far has just closed a step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BREAKS = ",.\n"
"""Characters that close a step (the token holding one is where a step is scored)."""

_STEP = re.compile(r"(-?\d+) ([+*-]) (\d+) = (-?\d+)(?=[,.\n])")
_STEP_AT_END = re.compile(r"(-?\d+) ([+*-]) (\d+) = (-?\d+)[,.\n]\Z")


@dataclass(frozen=True)
class Step:
    """One closed arithmetic step: operands, operator, stated result and where the result is written."""

    a: int
    op: str
    b: int
    result: int
    start: int
    """Character offset where the step (its first operand) begins."""
    result_start: int
    """Character offset where the stated result begins."""
    end: int
    """Character offset of the break that closes the step."""

    @property
    def value(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b if self.op == "-" else self.a * self.b

    @property
    def wrong(self) -> bool:
        return self.result != self.value


def _step(match: re.Match, offset: int = 0) -> Step:
    return Step(int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4)),
                offset + match.start(), offset + match.start(4), offset + match.end(4))


def find_steps(text: str) -> list[Step]:
    """Every closed arithmetic step of `text`, in order."""
    return [_step(m) for m in _STEP.finditer(text)]


def step_at_end(text: str, lookback: int = 48) -> Step | None:
    """The step that the last character of `text` closes (that character is a break), or None.
    Only the last `lookback` characters are read: a step line is short."""
    if not text or text[-1] not in BREAKS:
        return None
    tail = text[-lookback:]
    match = _STEP_AT_END.search(tail)
    return None if match is None else _step(match, len(text) - len(tail))


def token_at_char(pieces: list[str], char: int, last_position: int) -> int:
    """The generated position of the token holding character `char` of `"".join(pieces)`, where `pieces`
    are the decoded texts of the newest tokens and the last of them is at generated position
    `last_position`."""
    remaining, position = sum(map(len, pieces)) - char, last_position + 1
    for piece in reversed(pieces):
        if remaining <= 0:
            break
        remaining -= len(piece)
        position -= 1
    return position
