import torch

from detector.artifact import Detector
from detector.features import FeatureRecipe, NormalisationStats
from detector.probe import HEADS, Probe
from inference.control.triggers import COMMIT, FALLBACK, Alarm, LearnedTrigger, RuleTrigger, decide


def _feed(trigger, seq, tokens, start=0):
    alarms = []
    for offset, token in enumerate(tokens):
        alarms.append(trigger.observe([seq], [start + offset], torch.tensor([token]), {}, None)[0])
    return alarms


def test_rule_fires_on_the_third_copy_of_a_block_and_estimates_the_onset():
    rule = RuleTrigger(ngram=4, window=64, count=3, budget=1000, budget_fraction=1.0, plan=False, think_close_id=None)
    prefix = list(range(100, 130))        # 30 distinct tokens
    block = list(range(10, 20))           # period 10
    alarms = _feed(rule, 0, prefix + block * 4)
    fired = [i for i, a in enumerate(alarms) if a is not None]
    # The 4-gram block[0:4] completes its third occurrence at 30 + 20 + 3.
    assert fired[0] == 30 + 20 + 3
    alarm = alarms[fired[0]]
    assert alarm.reason == "loop"
    assert alarm.onset == 30 + 10  # start of the second occurrence: one period kept


def test_rule_stays_silent_on_distinct_tokens_and_two_copies():
    rule = RuleTrigger(ngram=4, window=64, count=3, budget=1000, budget_fraction=1.0, plan=True, think_close_id=None)
    block = list(range(10, 30))
    assert all(a is None for a in _feed(rule, 0, block * 2 + list(range(50, 90))))
    assert rule.wants_plan(0)


def test_rule_window_forgets_old_copies():
    rule = RuleTrigger(ngram=3, window=20, count=3, budget=1000, budget_fraction=1.0, plan=False, think_close_id=None)
    filler = iter(range(1000, 2000))
    tokens = []
    for _ in range(3):  # the same 3-gram three times, 30 tokens apart: never 3 within 20 tokens
        tokens += [1, 2, 3] + [next(filler) for _ in range(27)]
    assert all(a is None for a in _feed(rule, 0, tokens))


def test_rule_budget_check_fires_at_the_configured_share():
    rule = RuleTrigger(ngram=8, window=64, count=3, budget=100, budget_fraction=0.5, plan=False, think_close_id=None)
    alarms = _feed(rule, 0, list(range(200, 260)))
    first = next(i for i, a in enumerate(alarms) if a is not None)
    assert first == 49 and alarms[first].reason == "budget"


def test_rule_restart_rebuilds_the_state_from_the_kept_tokens():
    rule = RuleTrigger(ngram=4, window=64, count=3, budget=1000, budget_fraction=1.0, plan=False, think_close_id=None)
    block = list(range(10, 20))
    rule.restart(0, block * 2)
    alarms = _feed(rule, 0, block[:4], start=20)
    assert alarms[-1] is not None and alarms[-1].onset == 10


def test_decide_commits_with_a_candidate_falls_back_without_and_obeys_the_config():
    alarm = Alarm("loop", 100, 80)
    assert decide(alarm, True, "auto", True) == COMMIT
    assert decide(alarm, False, "auto", True) == FALLBACK
    assert decide(alarm, True, "fallback", True) == FALLBACK
    assert decide(alarm, False, "commit", True) == COMMIT
    assert decide(alarm, False, "auto", False) == COMMIT  # no FP16 model: nothing to fall back to


def _detector(hidden_size=4, stride=2, patience=2):
    """A linear probe whose loop logit is 10 * (first channel) and fails logit is -10: loop alarms
    exactly where the first channel of the state is positive."""
    recipe = FeatureRecipe(layers=(0,), hidden_size=hidden_size, mean_window=0, stride=stride)
    probe = Probe(recipe.feature_dim, hidden_width=0, heads=HEADS[:2])
    with torch.no_grad():
        for parameter in probe.parameters():
            parameter.zero_()
        probe.heads.weight[0, 0] = 10.0
        probe.heads.bias[1] = -10.0
    stats = NormalisationStats(mean=torch.zeros(1, hidden_size), std=torch.ones(1, hidden_size))
    card = {"calibration": {"stride": stride, "patience": patience,
                            "heads": {"loop_within_h": {"threshold": 0.5}, "fails_to_commit": {"threshold": 0.5}},
                            "plan": {"threshold": 0.9}}}
    return Detector(probe=probe, recipe=recipe, stats=stats, card=card)


def test_learned_trigger_alarms_after_patience_grid_steps_and_onset_is_the_run_start():
    trigger = LearnedTrigger(_detector(stride=2, patience=2))
    trigger.restart(7, [])
    alarms = []
    for position in range(20):
        state = torch.zeros(1, 4)
        state[0, 0] = 1.0 if position >= 9 else -1.0
        alarms.append(trigger.observe([7], [position], torch.tensor([5]), {0: state}, None)[0])
    fired = [i for i, a in enumerate(alarms) if a is not None]
    # Grid positions 10 and 12 are the first two above threshold: the alarm goes off at 12.
    assert fired[0] == 12
    assert alarms[12].reason == "loop_within_h" and alarms[12].onset == 10
    assert not trigger.wants_plan(7)  # fails_to_commit risk ~0 below the plan threshold


def test_learned_trigger_scores_rows_at_their_own_positions():
    trigger = LearnedTrigger(_detector(stride=2, patience=1))
    hot = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    # Row 0 is on the grid (position 4), row 1 is not (position 5): only row 0 can alarm.
    alarms = trigger.observe([0, 1], [4, 5], torch.tensor([1, 1]), {0: hot}, None)
    assert alarms[0] is not None and alarms[1] is None


def _decision_detector(commit_threshold=0.6, wrong_threshold=0.5):
    """A four-head linear probe: ends_wrong logit 10 * (channel 1), answer_correct logit 10 * (channel 2),
    loop and fails_to_commit silent; its card holds an action policy at one budget."""
    recipe = FeatureRecipe(layers=(0,), hidden_size=4, mean_window=0, stride=1)
    probe = Probe(recipe.feature_dim, hidden_width=0)
    with torch.no_grad():
        for parameter in probe.parameters():
            parameter.zero_()
        probe.heads.bias[:2] = -10.0
        probe.heads.weight[HEADS.index("ends_wrong"), 1] = 10.0
        probe.heads.weight[HEADS.index("answer_correct"), 2] = 10.0
    stats = NormalisationStats(mean=torch.zeros(1, 4), std=torch.ones(1, 4))
    heads = {h: {"threshold": 0.5} for h in HEADS}
    policy = {"budgets": [{"fp16_budget": 0.2, "wrong_threshold": wrong_threshold,
                           "commit_threshold": commit_threshold}]}
    card = {"calibration": {"stride": 1, "patience": 1, "heads": heads, "plan": {"threshold": 0.9},
                            "policy": policy}}
    return Detector(probe=probe, recipe=recipe, stats=stats, card=card)


def _feed_states(trigger, states):
    """Observe one sequence (index 0) through `states` ([positions, 4]); the alarms, one per position."""
    trigger.restart(0, [])
    return [trigger.observe([0], [p], torch.tensor([5]), {0: states[p : p + 1]}, None)[0] for p in range(len(states))]


def test_learned_selection_commits_to_the_best_scored_candidate_or_falls_back():
    states = torch.full((6, 4), -1.0)
    states[1, 2] = 1.0   # a candidate completed at token 1 scores high (answer_correct ~1)
    states[3, 2] = -0.2  # one at token 3 scores low
    states[5, 1] = 1.0   # the wrong-answer risk rises at 5
    trigger = LearnedTrigger(_decision_detector(), fp16_budget=0.3)
    alarms = _feed_states(trigger, states)
    assert [i for i, a in enumerate(alarms) if a] == [5] and alarms[5].reason == "ends_wrong"
    assert trigger.policy_name == "learned-selection@0.2"
    assert trigger.plan_probe_tokens == 0 and not trigger.wants_plan(0)  # no evidence a plan helps: never plans
    assert trigger.select(0, alarms[5], [1, 3], "auto", True) == (COMMIT, 0)
    # Only the low-scored candidate before the onset: no commit clears the threshold, so FP16 takes over.
    assert trigger.select(0, alarms[5], [3], "auto", True) == (FALLBACK, None)
    # Without an FP16 model it still commits, to the best candidate it has.
    assert trigger.select(0, alarms[5], [3], "auto", False) == (COMMIT, 0)


def test_learned_trigger_without_a_budget_or_policy_keeps_the_earliest_candidate_policy():
    states = torch.full((6, 4), -1.0)
    states[5, 1] = 1.0
    trigger = LearnedTrigger(_decision_detector())  # no FP16 budget given: the old policy, no ends_wrong alarms
    assert trigger.policy_name == "earliest-candidate"
    assert all(a is None for a in _feed_states(trigger, states))
    assert trigger.select(0, Alarm("loop_within_h", 5, 4), [1, 3], "auto", True) == (COMMIT, 0)
    two_heads = LearnedTrigger(_detector(stride=1, patience=1), fp16_budget=0.3)
    assert two_heads.policy_name == "earliest-candidate" and two_heads.policy is None


def _step_detector(step_threshold=0.5):
    """Five linear heads: step_wrong logit 10 * (channel 3), the others silent; a policy with a step threshold."""
    detector = _decision_detector()
    probe = Probe(detector.recipe.feature_dim, hidden_width=0)
    with torch.no_grad():
        for parameter in probe.parameters():
            parameter.zero_()
        probe.heads.bias[:] = -10.0
        probe.heads.bias[HEADS.index("step_wrong")] = 0.0
        probe.heads.weight[HEADS.index("step_wrong"), 3] = 10.0
    detector.probe = probe
    detector.card["calibration"]["heads"] = {h: {"threshold": 0.5} for h in HEADS}
    detector.card["calibration"]["policy"]["budgets"][0]["step_threshold"] = step_threshold
    return detector


def test_learned_trigger_rewrites_a_step_it_scores_wrong_from_where_its_result_begins():
    from training.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    text = "Go.\n12 + 3 = 16\n16 * 2 = 32\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    states = torch.full((len(ids), 4), -1.0)
    first_break = text.index("16\n") + 2
    states[first_break, 3] = 1.0        # the step closed here scores wrong
    states[first_break - 1, 3] = 1.0    # a token that closes no step: never scored for step_wrong
    trigger = LearnedTrigger(_step_detector(), fp16_budget=0.3, tokenizer=tokenizer)
    trigger.restart(0, [])
    alarms = [trigger.observe([0], [p], torch.tensor([ids[p]]), {0: states[p : p + 1]}, None)[0]
              for p in range(len(ids))]
    fired = [p for p, a in enumerate(alarms) if a is not None]
    assert fired == [first_break]
    alarm = alarms[first_break]
    assert alarm.reason == "step_wrong" and alarm.span_to_break and alarm.onset == text.index("16\n")
    assert trigger.select(0, alarm, [], "auto", True) == (FALLBACK, None)
    # A card calibrated for step checks has FP16 check the flagged result; an older card rewrites it.
    assert not alarm.check
    checking = _step_detector()
    checking.card["calibration"]["policy"]["step_action"] = "check"
    trigger = LearnedTrigger(checking, fp16_budget=0.3, tokenizer=tokenizer)
    trigger.restart(0, [])
    alarms = [trigger.observe([0], [p], torch.tensor([ids[p]]), {0: states[p : p + 1]}, None)[0]
              for p in range(first_break + 1)]
    assert alarms[first_break].check and alarms[first_break].onset == text.index("16\n")
    # The same detector without a tokenizer to read steps with, or at a budget whose policy has no step
    # threshold, never rewrites.
    blind = LearnedTrigger(_step_detector(), fp16_budget=0.3)
    assert blind.step_head is None
    from detector.calibration import NEVER
    assert LearnedTrigger(_step_detector(NEVER), fp16_budget=0.3, tokenizer=tokenizer).step_head is None
