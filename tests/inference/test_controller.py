import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference.config import ControlConfig, SamplingConfig
from inference.control.controller import Controller, TraceState
from inference.control.triggers import AlwaysPlan, Alarm, NoTrigger, Trigger
from inference.evaluation.answers import extract_final_answer
from inference.evaluation.evaluate import run_controlled, run_method
from inference.prompts import Problem

BUDGET = 40


@pytest.fixture(scope="module")
def pair(tiny_model_dir, other_tiny_model_dir):
    """Two different random models with the embedded tokenizer: `2bit` and `fp16` stand-ins."""
    other = other_tiny_model_dir
    load = lambda folder: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # noqa: E731
    return {"2bit": load(tiny_model_dir), "fp16": load(other)}, AutoTokenizer.from_pretrained(tiny_model_dir)


def _problems(n):
    return [Problem(f"p{i}", f"Start with {i}. Add 3. What is the result?", str(i + 3), "arith") for i in range(n)]


def _sampling(**kw):
    return SamplingConfig(**{"temperature": 0.6, "top_p": 0.95, "top_k": 20, "budget": BUDGET, "seed": 3,
                             "batch_size": 4, **kw})


class Scripted(Trigger):
    """Alarms for sequence s at generated position alarm_at[s], with the onset `back` tokens earlier."""

    name = "scripted"

    def __init__(self, alarm_at, back=5):
        self.alarm_at, self.back = alarm_at, back
        self.seen, self.tokens = {}, {}

    def observe(self, seqs, positions, tokens, hidden, top_prob):
        for seq, position, token in zip(seqs, positions, tokens.tolist()):
            self.seen.setdefault(seq, []).append(position)
            self.tokens.setdefault(seq, {})[position] = token
        return [Alarm("loop", p, p - self.back) if self.alarm_at.get(s) == p else None for s, p in zip(seqs, positions)]


def test_no_trigger_reproduces_naive_decoding_token_for_token(pair):
    models, tokenizer = pair
    problems = _problems(6)
    naive = run_method(models["2bit"], tokenizer, problems, method="2bit", sampling=_sampling(), progress=False)
    controlled = run_controlled(models, tokenizer, problems, method="none", trigger=NoTrigger(),
                                sampling=_sampling(), control=ControlConfig(), progress=False)
    for a, b in zip(naive, controlled):
        assert a.text == b.text and a.tokens_2bit == b.tokens_2bit and b.tokens_fp16 == 0 and b.actions == []


def test_every_sequence_falling_back_at_once(pair):
    models, tokenizer = pair
    problems = _problems(6)
    trigger = Scripted({i: 4 for i in range(6)}, back=2)
    control = ControlConfig(on_alarm="fallback")
    sampling = _sampling(batch_size=6)  # one batch: the naive run draws the same random stream up to the alarms
    records = run_controlled(models, tokenizer, problems, method="rule", trigger=trigger, sampling=sampling,
                             control=control, progress=False)
    naive = run_method(models["2bit"], tokenizer, problems, method="2bit", sampling=sampling, progress=False)
    acted = 0
    for record, plain in zip(records, naive):
        plain_ids = tokenizer.encode(plain.text)
        if not _eligible(tokenizer, plain, 4):
            assert record.actions == []  # ended or closed its thinking before the alarm: nothing to watch
            continue
        acted += 1
        (action,) = record.actions
        assert action["kind"] == "fallback" and action["position"] == 4 and action["onset"] == 2
        assert record.tokens_2bit == 5
        assert record.generated_tokens == 2 + record.tokens_fp16
        assert record.tokens_fp16 == BUDGET - 2 or record.finish_reason == "eos"
        # The FP16 model prefilled prompt + the 2 kept tokens, which are the 2-bit model's own.
        assert record.prefill_fp16 == record.prompt_tokens + 2
        assert tokenizer.encode(record.text)[:2] == plain_ids[:2]
    assert acted >= 4
    # After the fallback the trigger no longer watches the trace (FP16 finishes it).
    assert all(max(positions) <= 4 for positions in trigger.seen.values())


def _eligible(tokenizer, record, position):
    """Whether a naive trace was still thinking at `position` (so a trigger watching it could fire)."""
    ids = tokenizer.encode(record.text)
    return len(ids) > position + 1 and "</think>" not in tokenizer.decode(ids[: position + 1])


def test_only_some_sequences_act_and_the_rest_are_untouched(pair):
    models, tokenizer = pair
    problems = _problems(4)
    naive = run_method(models["2bit"], tokenizer, problems, method="2bit", sampling=_sampling(), progress=False)
    chosen = next(i for i, r in enumerate(naive) if _eligible(tokenizer, r, 3))
    records = run_controlled(models, tokenizer, problems, method="rule", trigger=Scripted({chosen: 3}),
                             sampling=_sampling(), control=ControlConfig(on_alarm="commit"), progress=False)
    # The chosen sequence commits (no candidate in random text: it closes the thinking and answers); the
    # others, decoded in the same batch with the same random stream, are exactly the naive traces.
    assert [a["kind"] for a in records[chosen].actions] == ["commit"]
    assert "</think>" in records[chosen].text and records[chosen].tokens_forced > 0
    assert records[chosen].finish_reason in ("forced", "budget")
    for index in set(range(4)) - {chosen}:
        assert records[index].text == naive[index].text and records[index].actions == []


def test_commit_prefers_the_earliest_candidate_before_the_onset(pair):
    models, tokenizer = pair
    controller = Controller(models, tokenizer, NoTrigger(), ControlConfig(), _sampling(), "rule")
    text = "<think>\nSo the result is 45.\nWait, let me check. So the result is 46.\n45 + 1 = 46\n45 + 1 = 46\n"
    state = TraceState(0, _problems(1)[0], [1, 2, 3], phase="reason", generated=tokenizer.encode(text))
    controller._act(state, Alarm("loop", len(state.generated) - 1, len(state.generated) - 5))
    final = tokenizer.decode(state.generated, skip_special_tokens=True)
    assert state.phase == "done" and state.finish_reason == "forced"
    assert state.actions[-1]["kind"] == "commit" and state.actions[-1]["answer"] == "45"
    assert extract_final_answer(final) == "45"


def test_plan_is_written_by_fp16_within_its_budget(pair):
    models, tokenizer = pair
    records = run_controlled(models, tokenizer, _problems(3), method="plan-only", trigger=AlwaysPlan(),
                             sampling=_sampling(), control=ControlConfig(plan_tokens=8, plan_stop="\u2603"),
                             progress=False)
    for record in records:
        plan = record.actions[0]
        assert plan["kind"] == "plan" and plan["tokens"] <= 8
        assert record.tokens_fp16 == plan["tokens"]
        assert record.generated_tokens == record.tokens_fp16 + record.tokens_2bit
        assert record.tokens_2bit > 0 or record.finish_reason == "eos"


def test_fallback_span_hands_back_to_2bit(pair):
    models, tokenizer = pair
    records = run_controlled(models, tokenizer, _problems(2), method="rule", trigger=Scripted({0: 8, 1: 8}),
                             sampling=_sampling(), control=ControlConfig(on_alarm="fallback", fallback_span=6),
                             progress=False)
    for record in records:
        kinds = [a["kind"] for a in record.actions]
        if record.finish_reason == "eos" and len(kinds) == 1:
            continue  # the FP16 span ended the trace
        assert kinds[:2] == ["fallback", "handback"]
        assert record.tokens_fp16 == 6


class ProbePlanner(Trigger):
    """Plans the traces whose first probed token is even (a stand-in for the learned early risk)."""

    name = "probe-planner"

    def __init__(self):
        self.first = {}

    @property
    def plan_probe_tokens(self):
        return 1

    def observe(self, seqs, positions, tokens, hidden, top_prob):
        for seq, position, token in zip(seqs, positions, tokens.tolist()):
            if position == 0:
                self.first[seq] = token
        return [None] * len(seqs)

    def wants_plan(self, seq):
        return self.first.get(seq, 1) % 2 == 0


def test_learned_style_planning_reads_the_probe_tokens_and_drops_them_when_it_plans(pair):
    models, tokenizer = pair
    trigger = ProbePlanner()
    records = run_controlled(models, tokenizer, _problems(8), method="learned", trigger=trigger,
                             sampling=_sampling(), control=ControlConfig(plan_tokens=4, plan_stop="\u2603"),
                             progress=False)
    assert len(trigger.first) == 8  # every trace's first 2-bit token was observed before deciding
    for index, record in enumerate(records):
        kinds = [a["kind"] for a in record.actions]
        if trigger.first[index] % 2 == 0:
            assert kinds[:2] == ["probe_dropped", "plan"] and record.tokens_fp16 == record.actions[1]["tokens"]
            assert record.tokens_2bit == 1 + (record.generated_tokens - record.tokens_fp16)
        else:
            assert kinds == [] and record.tokens_fp16 == 0


@pytest.mark.parametrize("control", [ControlConfig(on_alarm="fallback", fallback_span=6),
                                     ControlConfig(on_alarm="commit")])
def test_actions_work_the_same_on_the_static_decode_path(pair, control):
    models, tokenizer = pair
    problems = _problems(4)
    runs = {}
    for decode in ("dynamic", "static"):
        sampling = _sampling(temperature=0.0, decode=decode)
        runs[decode] = run_controlled(models, tokenizer, problems, method="rule",
                                      trigger=Scripted({0: 3, 1: 6, 3: 2}), sampling=sampling, control=control,
                                      progress=False)
    assert any(record.actions for record in runs["static"])
    for dynamic, static in zip(runs["dynamic"], runs["static"]):
        assert static.text == dynamic.text and static.actions == dynamic.actions
        assert (static.tokens_2bit, static.tokens_fp16, static.prefill_fp16) == \
               (dynamic.tokens_2bit, dynamic.tokens_fp16, dynamic.prefill_fp16)


class StepScripted(Trigger):
    """A step-rewrite alarm for every sequence at generated position 8, its result beginning at 6."""

    name = "step-scripted"

    def __init__(self):
        self.fired = set()

    def observe(self, seqs, positions, tokens, hidden, top_prob):
        alarms = []
        for seq, p in zip(seqs, positions):
            alarms.append(Alarm("step_wrong", p, 6, span_to_break=True) if p == 8 and seq not in self.fired else None)
            if p == 8:
                self.fired.add(seq)
        return alarms


def test_a_step_rewrite_cuts_to_the_result_and_fp16_writes_to_the_break_then_hands_back(pair):
    from inference.control.arithmetic import BREAKS
    from inference.control.controller import STEP_REWRITE_TOKENS

    models, tokenizer = pair
    controller = Controller(models, tokenizer, StepScripted(), ControlConfig(max_interventions=1),
                            _sampling(budget=30), "learned")
    states = controller.run(_problems(4), progress=False)
    assert any(state.actions for state in states)
    for state in states:
        if not state.actions:
            # ended before the alarm, or closed its thinking first (no longer watched)
            assert len(state.generated) <= 8 or controller.think_close in state.generated[:9]
            continue
        kinds = [a["kind"] for a in state.actions]
        assert kinds[0] == "rewrite" and state.interventions == 0 and state.step_rewrites == 1
        assert state.actions[0]["onset"] == 6 and state.actions[0]["cut_tokens"] == 3
        if state.finish_reason == "eos" and len(kinds) == 1:
            continue  # FP16 ended the trace inside its span
        assert kinds[1] == "handback"
        written = state.generated[6 : state.actions[1]["position"]]
        assert len(written) == state.tokens["fp16"] <= STEP_REWRITE_TOKENS
        pieces = [tokenizer.decode([t]) for t in written]
        # FP16 stopped at the first token holding a break, or after the most tokens a rewrite may take.
        assert len(written) == STEP_REWRITE_TOKENS or any(c in BREAKS for c in pieces[-1])
        assert not any(c in BREAKS for piece in pieces[:-1] for c in piece)
    # Without an FP16 model a rewrite cannot happen: the 2-bit model goes on.
    alone = Controller({"2bit": models["2bit"]}, tokenizer, StepScripted(), ControlConfig(), _sampling(budget=30),
                       "learned").run(_problems(2), progress=False)
    assert all(s.actions == [] and s.tokens["fp16"] == 0 for s in alone)


class StepChecked(StepScripted):
    """`StepScripted`, with alarms that have FP16 check the result before rewriting it."""

    def observe(self, seqs, positions, tokens, hidden, top_prob):
        return [None if a is None else Alarm(a.reason, a.position, a.onset, span_to_break=True, check=True)
                for a in super().observe(seqs, positions, tokens, hidden, top_prob)]


def _fp16_probs(models, state, start, end, temperature):
    """FP16's probability (softmax at `temperature`) of generated tokens start..end-1, one unpadded pass."""
    ids = torch.tensor([state.prompt_ids + state.generated[:end]])
    with torch.no_grad():
        logits = models["fp16"](input_ids=ids).logits[0].float()
    probs = torch.softmax(logits / temperature, dim=-1)
    offset = len(state.prompt_ids)
    return [float(probs[offset + i - 1, state.generated[i]]) for i in range(start, end)]


def test_a_step_check_accepts_a_result_fp16_agrees_with_and_rewrites_from_the_first_token_it_rejects(pair):
    models, tokenizer = pair
    sampling = _sampling(budget=30)
    # Accepting everything (threshold 0): each flagged result is checked once and the trace goes on unchanged.
    accepting = Controller(models, tokenizer, StepChecked(), ControlConfig(step_check_min_prob=0.0), sampling,
                           "learned")
    states = accepting.run(_problems(4), progress=False)
    checked = [s for s in states if s.actions]
    assert checked
    for state in checked:
        record = state.actions[0]
        assert record["kind"] == "check" and record["accepted"] and state.checks == 1
        assert state.step_rewrites == 0 and state.tokens["fp16"] == 0 and state.interventions == 0
        assert [a["kind"] for a in state.actions] == ["check"]
        # The padded batch read the same probabilities as one unpadded pass over the checked trace.
        assert record["min_prob"] == pytest.approx(min(_fp16_probs(models, state, 6, 9, sampling.temperature)),
                                                   abs=2e-4)
    # An accepted check does not stop the trace: with every check accepted, each trace is token for token
    # the naive 2-bit one and the 2-bit model prefilled only the prompt.
    naive = run_method(models["2bit"], tokenizer, _problems(4), method="2bit", sampling=sampling, progress=False)
    for state, plain in zip(states, naive):
        assert tokenizer.decode(state.generated, skip_special_tokens=True) == plain.text
        assert state.prefill["2bit"] == len(state.prompt_ids)
    # Rejecting everything (threshold 1): the cut is at the result's first token and FP16 rewrites from there.
    rejecting = Controller(models, tokenizer, StepChecked(), ControlConfig(step_check_min_prob=1.0), sampling,
                           "learned")
    for state in rejecting.run(_problems(4), progress=False):
        if not state.actions:
            continue
        kinds = [a["kind"] for a in state.actions]
        assert kinds[:2] == ["check", "rewrite"] and not state.actions[0]["accepted"] and state.checks == 1
        assert state.actions[1]["onset"] == 6 and state.actions[1]["reason"] == "step_check"
        assert 0 < state.tokens["fp16"] and state.step_rewrites == 1
    # Checks are counted on the records and read the FP16 weights once each in the memory-bound model.
    from inference.evaluation.compare import modeled_costs
    from inference.evaluation.evaluate import run_controlled

    records = run_controlled(models, tokenizer, _problems(4), method="learned", trigger=StepChecked(),
                             sampling=sampling, control=ControlConfig(step_check_min_prob=0.0), progress=False)
    assert sum(r.checks_fp16 for r in records) == sum(1 for r in records for a in r.actions if a["kind"] == "check") > 0
    unit = {"2bit": {"decode_seconds_per_token": 0.0, "prefill_seconds_per_token": 0.0},
            "fp16": {"decode_seconds_per_token": 0.0, "prefill_seconds_per_token": 0.0}}
    read = modeled_costs(records, unit, {"2bit": 1, "fp16": 100})["weight_bytes_read"]
    assert read == sum(r.tokens_2bit + 100 * (r.tokens_fp16 + r.checks_fp16) for r in records)


class ChecksAt(Trigger):
    """A checking step alarm for every sequence at the first 2-bit position at or past each of `at`, its
    result beginning two tokens earlier."""

    name = "checks-at"

    def __init__(self, at=(8, 14, 20)):
        self.at, self.fired = at, {}

    def observe(self, seqs, positions, tokens, hidden, top_prob):
        alarms = []
        for seq, p in zip(seqs, positions):
            done = self.fired.setdefault(seq, set())
            due = [t for t in self.at if p >= t and t not in done]
            done.update(due)
            alarms.append(Alarm("step_wrong", p, p - 2, span_to_break=True, check=True) if due else None)
        return alarms


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_cached_step_checks_read_only_the_new_tokens_and_judge_as_a_whole_read(pair, threshold):
    """With the FP16 cache a check reads what the trace added since the last one (after a rewrite: from
    where the trace was cut) and judges the same as reading the whole trace; accepted or rejected."""
    models, tokenizer = pair
    runs = {}
    for cached in (True, False):
        control = ControlConfig(step_check_min_prob=threshold, step_check_cache=cached, max_step_rewrites=5)
        runs[cached] = Controller(models, tokenizer, ChecksAt(), control, _sampling(budget=30), "learned").run(
            _problems(4), progress=False)
    assert sum(s.checks >= 2 for s in runs[True]) >= 2  # later checks, which the cache serves
    for with_cache, whole in zip(runs[True], runs[False]):
        assert with_cache.generated == whole.generated
        assert [(a["kind"], a.get("onset"), a.get("accepted")) for a in with_cache.actions] == \
               [(a["kind"], a.get("onset"), a.get("accepted")) for a in whole.actions]
        for a, b in zip(with_cache.actions, whole.actions):
            if a["kind"] == "check":
                assert a["min_prob"] == pytest.approx(b["min_prob"], abs=2e-4)
        assert with_cache.held == {}  # dropped when the trace ended
    read = {cached: sum(s.prefill["fp16"] for s in states) for cached, states in runs.items()}
    assert read[True] < read[False]
    if threshold == 0.0:
        # Nothing is cut: the first check reads prompt and trace, each later one the tokens since the last.
        for state in runs[True]:
            positions = [a["position"] for a in state.actions]
            assert state.prefill["fp16"] == (len(state.prompt_ids) + positions[-1] + 1 if positions else 0)


def _handback_runs(pair, **control):
    """Every sequence alarms at 2-bit position 8 (onset 5); FP16 writes 4 tokens and hands back; with the round
    cache on and off."""
    models, tokenizer = pair
    runs, seen = {}, {}
    for cached in (True, False):
        trigger = Scripted({i: 8 for i in range(6)}, back=3)
        config = ControlConfig(on_alarm="fallback", fallback_span=4, round_cache=cached, **control)
        controller = Controller(models, tokenizer, trigger, config, _sampling(batch_size=6), "rule")
        runs[cached] = controller.run(_problems(6), progress=False)
        seen[cached] = trigger.tokens
        assert controller._held_bytes == 0  # every trace ended, and its caches were dropped
    return runs, seen


def test_the_round_cache_prefills_only_what_a_trace_added_since_its_models_last_batch(pair):
    runs, seen = _handback_runs(pair)
    handed_back = 0
    for index, (with_cache, whole) in enumerate(zip(runs[True], runs[False])):
        assert with_cache.generated == whole.generated and with_cache.actions == whole.actions
        assert with_cache.passes == whole.passes and with_cache.tokens == whole.tokens
        prompt = len(with_cache.prompt_ids)
        if [a["kind"] for a in with_cache.actions] != ["fallback", "handback"] or with_cache.tokens["fp16"] != 4:
            continue
        handed_back += 1
        # The 2-bit model read the prompt, then only FP16's 4 tokens (less those that repeat the cut 2-bit ones):
        # its cache held prompt + its first 8 tokens, cut back to the onset. Read whole, it reads the prompt, then
        # prompt + 5 kept + 4 written.
        first = [seen[True][index][p] for p in range(9)]
        assert with_cache.generated[:5] == first[:5]
        same = next((i for i in range(4) if with_cache.generated[5 + i] != first[5 + i]), 3)
        assert with_cache.prefill["2bit"] == prompt + 4 - same
        assert whole.prefill["2bit"] == prompt + prompt + 5 + 4
        assert with_cache.prefill["fp16"] == whole.prefill["fp16"] == prompt + 5  # FP16 held nothing before
        assert with_cache.passes == {"2bit": 2, "fp16": 1}
        assert with_cache.held == {}  # dropped when the trace ended
    assert handed_back >= 2


def test_round_caches_past_their_memory_cap_are_not_kept(pair):
    runs, _ = _handback_runs(pair, round_cache_gib=0.0)
    for capped, whole in zip(runs[True], runs[False]):
        assert capped.generated == whole.generated and capped.prefill == whole.prefill
    # Room for three of the six first 2-bit caches (prompt + 8 tokens, float32): the first three traces of the
    # batch keep theirs and resume from them; the others, and FP16 after them, read whole.
    models, tokenizer = pair
    config = models["2bit"].config
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4
    prompt = len(runs[False][0].prompt_ids)
    assert all(len(state.prompt_ids) == prompt for state in runs[False])
    runs, _ = _handback_runs(pair, round_cache_gib=3.5 * (prompt + 8) * per_token / 2**30)
    kept = [capped.prefill["2bit"] < whole.prefill["2bit"] for capped, whole in zip(runs[True], runs[False])]
    assert kept[3:] == [False] * 3 and any(kept[:3])
    for capped, whole in zip(runs[True], runs[False]):
        assert capped.generated == whole.generated and capped.prefill["fp16"] == whole.prefill["fp16"]


def test_active_traces_bounds_the_traces_in_flight_and_their_held_caches(pair):
    """With rescue.active_traces 2, no batch holds more than 2 traces and at most 2 traces hold caches; every
    trace still ends, each as it would alone (greedy, with the unbounded run's tokens)."""
    models, tokenizer = pair
    runs, seen = {}, []
    for active in (0, 2):
        trigger = Scripted({i: 8 for i in range(6)}, back=3)
        config = ControlConfig(on_alarm="fallback", fallback_span=4, active_traces=active)
        controller = Controller(models, tokenizer, trigger, config, _sampling(temperature=0.0, batch_size=4), "rule")
        decode_batch = controller._decode_batch

        def spy(batch, precision, generator):
            if active:
                holding = [s for s in controller_states if s.held]
                seen.append((len(batch), len(holding)))
            decode_batch(batch, precision, generator)

        controller_states = []
        original_start = controller._start

        def start(state):
            controller_states.append(state)
            original_start(state)

        controller._decode_batch, controller._start = spy, start
        runs[active] = controller.run(_problems(6), progress=False)
    assert seen and max(size for size, _ in seen) <= 2 and max(holding for _, holding in seen) <= 2
    assert len(controller_states) == 6 and all(s.phase == "done" for s in runs[2])
    for bounded, unbounded in zip(runs[2], runs[0]):
        assert bounded.generated == unbounded.generated and bounded.actions == unbounded.actions
