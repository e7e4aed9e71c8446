from inference.control.arithmetic import find_steps, step_at_end


def test_find_steps_checks_each_result_against_its_operands():
    text = "27 + 39 = 66\n66 - 33 = 33\n33 * 2 = 67.\nLet me verify: 27 + 39 = 66, 66 - 33 = 44, so"
    steps = find_steps(text)
    assert [(s.a, s.op, s.b, s.result) for s in steps] == [(27, "+", 39, 66), (66, "-", 33, 33), (33, "*", 2, 67),
                                                          (27, "+", 39, 66), (66, "-", 33, 44)]
    assert [s.wrong for s in steps] == [False, False, True, False, True]
    third = steps[2]
    assert text[third.result_start:third.end] == "67" and text[third.end] == "."


def test_an_unclosed_step_is_not_a_step_yet():
    assert find_steps("12 + 3 = 15") == []
    assert step_at_end("12 + 3 = 15") is None
    assert step_at_end("12 + 3 = 1") is None


def test_step_at_end_reads_the_step_its_break_closes():
    text = "Plan: go.\n5 - 8 = -3\n-3 * 4 = -12,"
    step = step_at_end(text)
    assert (step.a, step.op, step.b, step.result, step.wrong) == (-3, "*", 4, -12, False)
    assert text[step.result_start:step.end] == "-12" and step.end == len(text) - 1
    assert step_at_end(text + " then") is None
    # A long prefix is not re-read: offsets still count from the start of the whole text.
    long = "x" * 500 + "\n2 + 2 = 5\n"
    step = step_at_end(long)
    assert step.wrong and long[step.result_start] == "5"


def test_a_break_after_the_break_closes_nothing():
    # "= 488." closed the step; the newline after it closes no other step.
    assert step_at_end("122 * 4 = 488.") is not None
    assert step_at_end("122 * 4 = 488.\n") is None
