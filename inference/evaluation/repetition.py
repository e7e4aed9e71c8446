"""A deliberately naive repetition check, used to report how often traces loop.

This is the rule DESIGN.md measured with, kept simple on purpose; it is not the `loop_onset`
labeler (that comes with trace collection and must tell a legitimate re-check from a loop).
"""

from __future__ import annotations

from inference.evaluation.answers import split_thinking

LINE_REPEATS = 3
SEGMENT_MIN_CHARS = 8
SEGMENT_REPEATS = 4
TAIL_CHARS = 240


def has_loop(text: str) -> bool:
    """Whether the thinking part of a generated trace looks repetitive.

    Reads the thinking (between an optional `<think>` and `</think>`; the whole trace if `</think>`
    never came) and fires when either
    - the same non-empty line (compared without surrounding whitespace) occurs 3 times in a row, or
    - some segment of 8 to 60 characters occurs at least 4 times, non-overlapping, within the last
      240 characters of the thinking.

    It knows nothing about meaning: a legitimate verification pass that redoes the same steps, or a
    run of similar-looking lines, can trip it (DESIGN.md measured it firing on 18% of healthy FP16
    traces of the reasoning-like style).
    """
    thinking, _, _ = split_thinking(text)
    return _repeats_a_line(thinking) or _repeats_a_segment(thinking[-TAIL_CHARS:])


def _repeats_a_line(thinking: str) -> bool:
    previous, run = None, 0
    for line in thinking.splitlines():
        line = line.strip()
        run = run + 1 if line and line == previous else 1
        previous = line
        if line and run >= LINE_REPEATS:
            return True
    return False


def _repeats_a_segment(tail: str) -> bool:
    # Checking 8-character segments is the whole 8-60 rule: a longer segment occurring k times
    # non-overlapping has its first 8 characters at the same starts, hence k times non-overlapping
    # too, and str.count (leftmost, non-overlapping) finds the largest such count.
    width = SEGMENT_MIN_CHARS
    seen = set()
    for start in range(len(tail) - width * SEGMENT_REPEATS + 1):
        segment = tail[start : start + width]
        if segment in seen:
            continue
        seen.add(segment)
        if tail.count(segment, start) >= SEGMENT_REPEATS:
            return True
    return False
