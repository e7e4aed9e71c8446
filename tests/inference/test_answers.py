import pytest

from inference.evaluation.answers import (
    CandidateAnswer,
    extract_final_answer,
    find_candidate_answers,
    split_thinking,
)

QWEN_STYLE_TRACE = (
    "<think>\nOkay, the rectangle is 3 by 4, so the diagonal is sqrt(9 + 16).\n"
    "9 + 16 = 25, and sqrt(25) = 5. So the answer is 5.\n"
    "Wait, let me double-check: 3^2 + 4^2 = 25. Yes.\n</think>\n\n"
    "The diagonal is $\\sqrt{3^2+4^2} = 5$.\n\n**Final Answer**\n\\[\n\\boxed{5}\n\\]"
)


def test_split_thinking_separates_reasoning_from_reply():
    thinking, after, closed = split_thinking("<think>\nreasoning\n</think>\n\nreply")
    assert (thinking, after, closed) == ("\nreasoning\n", "\n\nreply", True)


def test_split_thinking_without_opening_tag():
    assert split_thinking("reasoning</think>reply") == ("reasoning", "reply", True)


def test_split_thinking_unclosed_is_all_thinking():
    assert split_thinking("<think>still going and going") == ("still going and going", "", False)


def test_split_thinking_stops_at_the_first_close():
    assert split_thinking("a</think>b</think>c") == ("a", "b</think>c", True)


def test_final_answer_from_qwen_style_trace():
    assert extract_final_answer(QWEN_STYLE_TRACE) == "5"


def test_final_answer_keeps_nested_braces():
    text = "<think>half</think>So $p = \\boxed{\\frac{1}{2}}$."
    assert extract_final_answer(text) == "\\frac{1}{2}"


def test_final_answer_deeply_nested_box():
    text = "</think>\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}"
    assert extract_final_answer(text) == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_last_box_wins():
    text = "<think>...</think>First I thought \\boxed{12}, but correcting: \\boxed{14}."
    assert extract_final_answer(text) == "14"


def test_box_cut_off_by_the_budget_is_ignored():
    text = "</think>\\boxed{7} and then \\boxed{\\frac{1}{"
    assert extract_final_answer(text) == "7"


def test_box_inside_thinking_is_not_a_final_answer():
    assert extract_final_answer("<think>maybe \\boxed{3}</think>I am not sure.") is None


def test_unclosed_thinking_never_committed():
    text = "<think>So the answer is \\boxed{42}. Wait, let me verify again. Wait, let me verify again."
    assert extract_final_answer(text) is None


def test_gsm8k_style_hashes():
    text = "<think>48/2 = 24, 48 + 24 = 72</think>\nShe sold 72 clips.\n#### 72"
    assert extract_final_answer(text) == "72"


def test_answer_is_sentence_without_trailing_period():
    assert extract_final_answer("<think>7+10</think>The answer is 17.") == "17"


def test_final_answer_is_with_dollars():
    text = "<think>..</think>Therefore, the final answer is $\\frac{3}{4}$."
    assert extract_final_answer(text) == "\\frac{3}{4}"


def test_answer_is_keeps_decimals():
    assert extract_final_answer("</think>The answer is 3.75.") == "3.75"


def test_box_is_preferred_over_a_stated_answer():
    text = "</think>The answer is 16.\n\n\\boxed{17}"
    assert extract_final_answer(text) == "17"


def test_no_answer_after_thinking_is_none():
    assert extract_final_answer("<think>hmm</think>I could not solve it.") is None


def test_candidates_carry_their_offsets_in_the_full_trace():
    candidates = find_candidate_answers(QWEN_STYLE_TRACE)

    assert [c.text for c in candidates] == ["5"]
    only = candidates[0]
    assert QWEN_STYLE_TRACE[only.start : only.end] == "5"
    assert QWEN_STYLE_TRACE[: only.end].endswith("So the answer is 5")


def test_candidates_in_order_of_position():
    trace = (
        "<think>First pass: the result is 12.\n"
        "Hmm, so the answer is \\boxed{\\frac{1}{2}}.\n"
        "Answer: 13\n"
        "#### 14\n"
        "</think>\\boxed{14}"
    )
    candidates = find_candidate_answers(trace)

    assert [c.text for c in candidates] == ["12", "\\frac{1}{2}", "13", "14"]
    assert [c.start for c in candidates] == sorted(c.start for c in candidates)
    assert all(trace[c.start : c.end] == c.text for c in candidates)


def test_candidates_only_come_from_thinking():
    candidates = find_candidate_answers("<think>no idea yet</think>The answer is 9.")
    assert candidates == []


def test_candidates_in_an_unclosed_trace():
    trace = "<think>so the answer is 42. Wait, let me verify. so the answer is 42."
    candidates = find_candidate_answers(trace)
    assert [c.text for c in candidates] == ["42", "42"]
    assert candidates[0] == CandidateAnswer("42", trace.index("42"), trace.index("42") + 2)


def test_equations_ending_a_step_are_not_candidates():
    trace = "<think>x + 3 = 8\nso x = 5\nthen y = 2x = 10\n"
    assert find_candidate_answers(trace) == []


@pytest.mark.parametrize(
    "prose",
    [
        "the answer is probably wrong here",
        "the answer isn't 12, let me redo it",
        "the answer is not 12",
        "I need an answer: let me think",
    ],
)
def test_prose_after_answer_is_not_a_candidate(prose):
    assert find_candidate_answers(f"<think>{prose}\n") == []


def test_answer_is_stops_at_a_following_clause():
    trace = "<think>So the answer is 1,000, but wait, units.\n"
    assert [c.text for c in find_candidate_answers(trace)] == ["1,000"]


def test_boxed_answer_stated_with_answer_is_counts_once():
    trace = "<think>the final answer is $\\boxed{17}$.\n"
    assert [c.text for c in find_candidate_answers(trace)] == ["17"]


def test_choice_letter_is_a_candidate():
    assert [c.text for c in find_candidate_answers("<think>The answer is (C).\n")] == ["(C)"]
