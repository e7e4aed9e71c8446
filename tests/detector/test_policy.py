"""Learned action selection calibrated for an FP16 budget (detector/policy.py)."""

import numpy as np
import pytest

from detector.calibration import NEVER
from detector.policy import (PolicyTrace, best_candidate, candidate_scores, choose_policy, policy_for_budget,
                             simulate)


def _trace(wrong_peak_at, correct, candidate=None, length=100):
    """A trace on a grid of 10 steps (positions 0, 10, ..., 90); `ends_wrong` jumps to 0.9 at step
    `wrong_peak_at` (None: stays at 0.1); `candidate`: (token, answer_correct score, correct)."""
    positions = np.arange(0, length, 10)
    wrong = np.full(len(positions), 0.1)
    if wrong_peak_at is not None:
        wrong[wrong_peak_at:] = 0.9
    return PolicyTrace(positions=positions, loop=np.zeros(len(positions)), wrong=wrong,
                       candidates=[candidate] if candidate else [], length=length, correct=correct)


def _validation():
    # Four healthy traces, two that go wrong with a correct candidate stated first (commit saves them),
    # two that go wrong with a wrong candidate (only FP16 can save them).
    return ([_trace(None, True) for _ in range(4)]
            + [_trace(3, False, (15, 0.95, True)) for _ in range(2)]
            + [_trace(3, False, (15, 0.2, False)) for _ in range(2)])


def test_simulate_commits_good_candidates_and_falls_back_on_the_rest():
    outcome = simulate(_validation(), NEVER, 0.5, 0.5, patience=1, fallback_success=1.0, reference=100)
    assert outcome["committed"] == pytest.approx(0.25) and outcome["fell_back"] == pytest.approx(0.25)
    assert outcome["accuracy"] == pytest.approx(1.0)
    # Fallbacks at position 30 cost 100 - 30 FP16 tokens each, out of every token of every trace.
    total = 4 * 100 + 2 * 31 + 2 * (30 + 70)
    assert outcome["fp16_share"] == pytest.approx(2 * 70 / total)


def test_a_zero_budget_only_commits_and_a_larger_one_also_falls_back():
    policy = choose_policy(_validation(), loop_threshold=NEVER, patience=1, fallback_success=1.0,
                           budgets=(0.0, 0.5))
    free, paid = policy["budgets"]
    assert free["modeled_fp16_share"] == 0.0 and free["modeled_accuracy"] == pytest.approx(0.75)
    assert free["committed"] >= 0.25 and free["fell_back"] == 0.0
    assert paid["modeled_accuracy"] == pytest.approx(1.0) and 0 < paid["modeled_fp16_share"] <= 0.5
    assert policy["reference_length"] == pytest.approx(100.0)


def test_accuracy_never_drops_as_the_budget_grows():
    rng = np.random.default_rng(0)
    traces = [_trace(int(rng.integers(1, 9)) if not ok else None, ok,
                     (5, float(rng.random()), bool(rng.random() < 0.5)))
              for ok in rng.random(40) < 0.4]
    accuracies = [b["modeled_accuracy"] for b in choose_policy(traces, NEVER, 1, 0.9)["budgets"]]
    assert accuracies == sorted(accuracies)


def test_policy_for_budget_takes_the_largest_calibrated_budget_not_above_it():
    policy = {"budgets": [{"fp16_budget": b} for b in (0.0, 0.1, 0.3)]}
    assert policy_for_budget(policy, 0.25)["fp16_budget"] == 0.1
    assert policy_for_budget(policy, 1.0)["fp16_budget"] == 0.3
    assert policy_for_budget(policy, 0.0)["fp16_budget"] == 0.0


def test_candidates_are_scored_at_the_next_grid_step_and_the_best_before_an_alarm_wins():
    positions = np.array([0, 8, 16, 24])
    scores = np.array([0.1, 0.7, 0.3, 0.9])
    scored = candidate_scores(positions, scores, [(3, True), (9, False), (30, True)])
    assert scored == [(3, 0.7, True), (9, 0.3, False)]  # the last is after the final grid step
    assert best_candidate(scored, before=9) == (3, 0.7, True)
    assert best_candidate(scored, before=3) is None


def test_step_rewrites_repair_traces_whose_every_wrong_step_is_caught():
    from detector.policy import step_outcomes, step_scores

    # Steps (closing token, step_wrong score, wrong, rewrite cost): wrong steps score 0.8, right ones 0.2
    # or 0.5. Two traces are wrong only through their arithmetic, one loses its answer another way.
    def stepped(correct, steps):
        trace = _trace(None, correct)
        trace.steps = steps
        return trace

    traces = ([stepped(True, [(12, 0.2, False, 3), (24, 0.5, False, 3)]) for _ in range(4)]
              + [stepped(False, [(12, 0.8, True, 3), (24, 0.2, False, 3)]) for _ in range(2)]
              + [stepped(False, [(12, 0.2, False, 3)])])
    repaired = step_outcomes(traces, 0.7)
    assert [r[0] for r in repaired] == [False] * 4 + [True, True, False]
    assert [r[2] for r in repaired] == [0, 0, 0, 0, 1, 1, 0]
    outcome = simulate(traces, NEVER, NEVER, NEVER, patience=1, fallback_success=1.0, reference=100,
                       step_threshold=0.7)
    assert outcome["accuracy"] == pytest.approx(6 / 7) and outcome["step_rewrites"] == pytest.approx(2 / 7)
    policy = choose_policy(traces, loop_threshold=NEVER, patience=1, fallback_success=1.0, use_steps=True,
                           step_action="rewrite")
    assert policy["step_rewrites"] and policy["step_action"] == "rewrite"
    free = policy_for_budget(policy, 0.0)
    assert free["step_threshold"] == NEVER and free["modeled_accuracy"] == pytest.approx(4 / 7)
    # A small budget buys the two rewrites that repair two traces, not the 0.5-scored right steps too.
    cheap = policy_for_budget(policy, 0.02)
    assert 0.5 < cheap["step_threshold"] <= 0.8 and cheap["modeled_accuracy"] == pytest.approx(6 / 7)
    # Without the step head the policy has no step threshold to choose.
    assert choose_policy(traces, loop_threshold=NEVER, patience=1, fallback_success=1.0)["budgets"][-1][
        "step_threshold"] == NEVER
    # Step scores are read at the exact captured position of each closing token.
    scored = step_scores(np.array([0, 8, 12, 16]), np.array([0.1, 0.2, 0.9, 0.3]), [(12, True, 10), (13, False, 12)])
    assert scored == [(12, pytest.approx(0.9), True, 3)]


def test_a_step_check_costs_one_fp16_pass_per_flagged_step_and_a_rewrite_only_for_the_wrong_ones():
    from detector.policy import step_outcomes

    trace = _trace(None, False)
    # (closing token, score, wrong, rewrite cost): one wrong step and two right ones, all flagged at 0.1.
    trace.steps = [(12, 0.9, True, 4), (24, 0.5, False, 4), (36, 0.3, False, 4)]
    assert step_outcomes([trace], 0.1, "rewrite") == [(True, 12.0, 3)]
    assert step_outcomes([trace], 0.1, "check") == [(True, 3.0 + 4.0, 3)]
    # A threshold above the wrong step's score repairs nothing, and checks only what it flags.
    assert step_outcomes([trace], 0.95, "check") == [(False, 0.0, 0)]
    assert step_outcomes([trace], 0.4, "check") == [(True, 2.0 + 4.0, 2)]
    with pytest.raises(ValueError, match="step action 'verify'"):
        step_outcomes([trace], 0.1, "verify")
    # Checking is cheaper than rewriting every flagged step, so a small budget buys more of it.
    traces = [trace] + [_trace(None, True) for _ in range(3)]
    for t in traces[1:]:
        t.steps = [(12, 0.5, False, 4), (24, 0.3, False, 4)]
    checked = choose_policy(traces, loop_threshold=NEVER, patience=1, fallback_success=1.0, use_steps=True)
    assert checked["step_action"] == "check"
    rewritten = choose_policy(traces, loop_threshold=NEVER, patience=1, fallback_success=1.0, use_steps=True,
                              step_action="rewrite")
    for a, b in zip(checked["budgets"], rewritten["budgets"]):
        assert a["modeled_accuracy"] >= b["modeled_accuracy"]


def test_a_modeled_gain_of_less_than_one_validation_trace_buys_no_fp16():
    # Falling back on the two traces only FP16 can save gains 2 x fallback_success traces of 8.
    noise = choose_policy(_validation(), NEVER, 1, fallback_success=0.4, budgets=(0.5,))["budgets"][0]
    assert noise["fell_back"] == 0.0 and noise["modeled_fp16_share"] == 0.0
    assert noise["modeled_accuracy"] == pytest.approx(0.75)
    gain = choose_policy(_validation(), NEVER, 1, fallback_success=0.6, budgets=(0.5,))["budgets"][0]
    assert gain["fell_back"] == pytest.approx(0.25) and gain["modeled_accuracy"] == pytest.approx(0.75 + 0.25 * 0.6)


def test_a_fallback_after_a_wrong_step_left_to_2bit_ends_as_the_trace_did():
    from detector.policy import first_unrepaired

    # Both traces go wrong at grid step 3 (position 30) with no candidate; one wrote a wrong step first
    # (closing at token 12), the other only after the alarm (token 50).
    early, late = _trace(3, False), _trace(3, False)
    early.wrong_steps, late.wrong_steps = [12], [50]
    outcome = simulate([early, late], NEVER, 0.5, NEVER, patience=1, fallback_success=1.0, reference=100)
    assert outcome["fell_back"] == pytest.approx(1.0)
    assert outcome["accuracy"] == pytest.approx(0.5)  # FP16 carries the early wrong result on
    # A step action that hands the early step to FP16 repairs it, and the fallback is modeled to succeed.
    early.steps = [(12, 0.9, True, 3)]
    assert first_unrepaired(early, 0.5) is None and first_unrepaired(early, 0.95) == 12
    outcome = simulate([early], NEVER, 0.5, NEVER, patience=1, fallback_success=1.0, reference=100,
                       step_threshold=0.95)
    assert outcome["accuracy"] == pytest.approx(0.0)
    early.steps = [(12, 0.9, True, 3), (40, 0.1, False, 3)]
    early.wrong_steps = [12, 60]  # every wrong step before the alarm handed over, one left after it
    outcome = simulate([early], NEVER, 0.5, NEVER, patience=1, fallback_success=1.0, reference=100,
                       step_threshold=0.5)
    assert outcome["fell_back"] == pytest.approx(1.0) and outcome["accuracy"] == pytest.approx(1.0)


def test_the_alarms_watch_a_repaired_trace_too_and_its_fallback_costs_fp16():
    # One wrong step (closing at token 12) that the step action hands to FP16: the trace is repaired. Its
    # wrong-answer score rises at grid step 3 (position 30), as a 2-bit trace's does after a wrong step.
    def repaired(candidate=None):
        trace = _trace(3, False, candidate)
        trace.steps, trace.wrong_steps = [(12, 0.9, True, 3)], [12]
        return trace

    quiet = simulate([repaired()], NEVER, NEVER, NEVER, patience=1, fallback_success=1.0, reference=100,
                     step_threshold=0.5)
    assert quiet["fell_back"] == 0.0 and quiet["accuracy"] == pytest.approx(1.0)
    alarmed = simulate([repaired()], NEVER, 0.5, NEVER, patience=1, fallback_success=1.0, reference=100,
                       step_threshold=0.5)
    # The fallback still ends right, but its FP16 tokens (100 - 30) come on top of the step's rewrite (3).
    assert alarmed["fell_back"] == pytest.approx(1.0) and alarmed["accuracy"] == pytest.approx(1.0)
    assert alarmed["fp16_share"] == pytest.approx((3 + 70) / (30 + 70))
    assert alarmed["fp16_share"] > quiet["fp16_share"]
    # A commit on a repaired trace is graded as the 2-bit trace stated the candidate.
    committed = simulate([repaired((15, 0.95, False))], NEVER, 0.5, 0.9, patience=1, fallback_success=1.0,
                         reference=100, step_threshold=0.5)
    assert committed["committed"] == pytest.approx(1.0) and committed["accuracy"] == 0.0
    # So a wrong-answer threshold that fires on repaired traces is priced, and a small budget refuses it.
    traces = [repaired() for _ in range(4)] + [_trace(None, True) for _ in range(4)]
    cheap = choose_policy(traces, NEVER, 1, fallback_success=1.0, use_steps=True, budgets=(0.1,))["budgets"][0]
    assert cheap["fell_back"] == 0.0 and cheap["step_threshold"] <= 0.9 and cheap["modeled_accuracy"] == 1.0
