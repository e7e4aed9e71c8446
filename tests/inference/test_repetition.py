import random
import string

from inference.evaluation.repetition import has_loop

HEALTHY_TRACE = (
    "<think>\nPlan: apply the 4 operations in order, then check.\n"
    "25 - 47 = -22\n-22 + 2 = -20\n-20 - 37 = -57\n-57 * 9 = -513\n"
    "So the result is -513.\n</think>\n\nThe answer is \\boxed{-513}."
)


def test_healthy_trace_is_not_a_loop():
    assert not has_loop(HEALTHY_TRACE)


def test_same_line_three_times_in_a_row_is_a_loop():
    assert has_loop("<think>\n12 + 5 = 17\n17 * 2 = 34\n17 * 2 = 34\n17 * 2 = 34\n</think>\nThe answer is 34.")


def test_same_line_twice_is_not_a_loop():
    assert not has_loop("<think>\n12 + 5 = 17\n17 * 2 = 34\n17 * 2 = 34\n</think>\nThe answer is 34.")


def test_repeated_line_ignores_surrounding_whitespace():
    assert has_loop("<think>\nWait.\n  Wait.\nWait.  \n</think>")


def test_blank_lines_are_not_a_repeated_line():
    assert not has_loop("<think>\nfirst step\n\n\n\n\nsecond step\n</think>")


def test_segment_repeated_four_times_in_the_tail_is_a_loop():
    looping = "<think>\nPlan: go.\n" + "Wait, 3 * 4 is 12, " * 4
    assert has_loop(looping)


def test_segment_repeated_three_times_is_not_a_loop():
    assert not has_loop("<think>\nPlan: go.\n" + "Wait, 3 * 4 is 12, " * 3)


def test_repetition_outside_the_last_240_characters_does_not_count():
    early_repeats = "abcdefgh " * 4
    filler = "".join(random.Random(0).choices(string.ascii_lowercase, k=250))
    assert len(filler) > 240
    assert not has_loop("<think>" + early_repeats + filler)


def test_segments_must_not_overlap():
    # "aaaaaaaaaaa" holds 4 overlapping copies of "aaaaaaaa" but only one non-overlapping copy.
    assert not has_loop("<think>xyz aaaaaaaaaaa xyz</think>")


def test_only_the_thinking_is_checked():
    assert not has_loop("<think>\none step\n</think>\n" + "ok\n" * 5)


def test_unclosed_thinking_is_checked_to_the_end():
    assert has_loop("<think>\n" + "let me check again\n" * 3)


def test_a_verification_pass_can_trip_the_check():
    # Documented false alarm: a legitimate re-check repeats whole steps.
    steps = "49 - 22 = 27, 27 - 38 = -11, "
    trace = f"<think>\n{steps}\nLet me verify: {steps}\nAgain: {steps}\nOnce more: {steps}\n</think>"
    assert has_loop(trace)
