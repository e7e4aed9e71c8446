"""The rescue controller: 2-bit decoding with targeted FP16 help, decided by a trigger.

Every trace is a small state machine; the controller moves a batch of them forward in *rounds*:

    probe  --(learned planning decision)-->  plan (FP16) --> reason (2-bit, watched by the trigger)
                                                               | alarm -> decide():
                                                               |   commit   -> forced answer, or `answer`
                                                               |   fallback -> cut to onset, `fp16`
                                                               v
                                                   eos / budget / forced -> done

- **plan**: the FP16 model writes at most `plan_tokens` tokens of outline, ending at `plan_stop`; the
  2-bit model reasons after it. With the learned trigger, the 2-bit model first writes
  `plan_probe_tokens` tokens whose states give the early risk; if the trigger plans, those tokens
  are dropped (and still counted as spent).
- **commit**: the thinking is closed with `commit_template` filled with the candidate answer the
  trigger selects among those stated before the estimated onset (the earliest, or the learned action
  policy's best-scored one), and the trace ends (finish reason `forced`); with no candidate,
  `commit_open` closes the thinking and the model writes its answer in at most `answer_tokens` tokens.
- **fallback**: the trace is cut back to the alarm's onset estimate and the FP16 model continues from
  the kept prefix (one prefill), to the end or for `fallback_span` tokens before handing back.
- **step rewrite** (a fallback for an alarm with `span_to_break`): the trace is cut back to where an
  arithmetic step's result begins, FP16 writes up to the step's break (at most `STEP_REWRITE_TOKENS`
  tokens) and hands back; at most `max_step_rewrites` per trace, not counted as interventions.
- **step check** (such an alarm with `check`): at once, inside the 2-bit batch, FP16 reads the trace in
  one forward pass and judges the result's tokens, from where it begins to the break, against
  `step_check_min_prob` (each token's probability under FP16 at the sampling temperature). If it accepts
  them all the 2-bit model goes on without stopping; otherwise the trace is cut at the first token it
  rejects and FP16 writes from there to the break, as in a rewrite. Each check is counted (`checks`):
  one more FP16 forward pass, its prefill counted as FP16's. With `rescue.step_check_cache` (the
  default) FP16 keeps each checked trace's KV cache until the trace ends: a check reads only the tokens
  after the longest prefix the cache still holds (cut back where the trace was cut), one trace at a
  time; without it the checks of a decoding step read their whole traces in one padded batch.

A round groups the unfinished traces by the model they need next and decodes each group in batches
of `sampling.batch_size`, each sequence prefilled once (counted: its tokens and the pass); with
`rescue.active_traces` N, only the first N unfinished traces take part, and a trace starts in the first
round after one ends (0, the default: every trace from the first round). With
`rescue.round_cache` (the default) each trace keeps each model's KV cache from its last batch (FP16's is
the one its step checks use too) until the trace ends: the next batch of that model prefills only the
tokens after the longest prefix the cache still holds (cut back where the trace was cut), instead of the
prompt and the whole trace so far. The caches of all traces together stay under `rescue.round_cache_gib`;
a trace whose cache would pass it keeps none. Inside a batch
each sequence stops on its own (EOS, its token limit, an alarm) while the others go on; once the
sequences waiting for an action outnumber the ones still decoding, the whole batch pauses so the
waiting ones are served in the next round instead of idling behind a few long traces.

Every token is counted by who produced it (`2bit`, `fp16`, `forced`), every prefill by precision, and
each sequence gets its share of every batch's wall time.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm import tqdm
from transformers import DynamicCache

from inference.config import ControlConfig, SamplingConfig
from inference.control.arithmetic import BREAKS
from inference.control.triggers import COMMIT, FALLBACK, PLAN, Alarm, Trigger
from inference.decoding.generate import FINISH_EOS, Sampler, eos_token_ids, generate
from inference.decoding.steps import cache_argument
from inference.evaluation.answers import find_candidate_answers, token_char_ends
from inference.prompts import Problem, render_prompt

PROBE, REASON, FP16_SPAN, ANSWER, DONE = "probe", "reason", "fp16", "answer", "done"
STEP_REWRITE_TOKENS = 8
"""Most FP16 tokens of one step rewrite (a result and its break)."""


@dataclass
class TraceState:
    """One problem's trace under the controller."""

    index: int
    problem: Problem
    prompt_ids: list[int]
    phase: str
    generated: list[int] = field(default_factory=list)
    answer_model: str = "2bit"
    limit: int = 0
    """Most tokens the current phase may add."""
    tokens: Counter = field(default_factory=Counter)
    prefill: Counter = field(default_factory=Counter)
    """Tokens each model read in prefills and checks (not those its held cache already had)."""
    passes: Counter = field(default_factory=Counter)
    """Prefill passes of each model over this trace (one per batch it joined)."""
    actions: list[dict] = field(default_factory=list)
    interventions: int = 0
    rewritten: set = field(default_factory=set)
    """Onsets FP16 has checked or rewritten a result at (FP16 is not asked twice about one result)."""
    to_break: bool = False
    """The current FP16 span ends at the next break (a step rewrite)."""
    finish_reason: str = "budget"
    wall_seconds: float = 0.0
    held: dict = field(default_factory=dict)
    """Per model, (token ids, a one-row KV cache of them, its bytes) kept between its batches (`rescue.round_cache`) and,
    for FP16, its step checks (`rescue.step_check_cache`); dropped when the trace ends."""

    @property
    def step_rewrites(self) -> int:
        return sum(1 for a in self.actions if a["kind"] == "rewrite")

    @property
    def checks(self) -> int:
        """FP16 forward passes that checked a step's result."""
        return sum(1 for a in self.actions if a["kind"] == "check")

    @property
    def model(self) -> str:
        if self.phase in (PLAN, FP16_SPAN):
            return "fp16"
        if self.phase == ANSWER:
            return self.answer_model
        return "2bit"


@dataclass
class _Stop:
    """Why a row left a batch: `alarm` (act on it), `rejected` (FP16 rejected a checked result at generated
    position `rejected`), `paused` (resume next round), `limit`, `plan_done`."""

    kind: str
    alarm: Alarm | None = None
    rejected: int | None = None


class Controller:
    """Runs one method (a trigger and the actions) over problems; see the module docstring."""

    def __init__(self, models: dict[str, object], tokenizer, trigger: Trigger, control: ControlConfig,
                 sampling: SamplingConfig, method: str):
        self.models, self.tokenizer, self.trigger = models, tokenizer, trigger
        self.control, self.sampling, self.method = control, sampling, method
        self.device = next(models["2bit"].parameters()).device
        self.sampler = Sampler(sampling.temperature, sampling.top_k, sampling.top_p)
        self.think_close = tokenizer.convert_tokens_to_ids("</think>")
        self.eos = eos_token_ids(tokenizer, models["2bit"])
        self.plan_stop = control.plan_stop
        self._held_bytes = 0
        """Bytes of all traces' held caches (`TraceState.held`), kept under `rescue.round_cache_gib`."""

    # -- the state machine ------------------------------------------------------------------------

    def _start(self, state: TraceState) -> None:
        if self.trigger.plan_probe_tokens:
            state.phase, state.limit = PROBE, self.trigger.plan_probe_tokens
            self.trigger.restart(state.index, [])
        elif self.trigger.wants_plan(state.index):
            self._begin_plan(state)
        else:
            self._begin_reasoning(state)

    def _begin_plan(self, state: TraceState) -> None:
        if self.control.plan_tokens < 1:
            self._begin_reasoning(state)
            return
        state.phase, state.limit = PLAN, self.control.plan_tokens
        state.actions.append({"kind": PLAN, "position": 0})

    def _begin_reasoning(self, state: TraceState) -> None:
        state.phase, state.limit = REASON, self.sampling.budget - len(state.generated)
        self.trigger.restart(state.index, state.generated)
        if state.limit <= 0:
            self._finish(state, "budget")

    def _finish(self, state: TraceState, reason: str) -> None:
        state.phase, state.finish_reason = DONE, reason
        for precision in list(state.held):
            self._drop(state, precision)

    def _after_segment(self, state: TraceState, new: list[int], stop: _Stop | None) -> None:
        """Move a trace on after one batch added `new` tokens to it."""
        state.generated.extend(new)
        ended = bool(new) and new[-1] in self.eos
        if state.phase == PROBE:
            if ended:
                self._finish(state, FINISH_EOS)
            elif self.trigger.wants_plan(state.index):
                state.actions.append({"kind": "probe_dropped", "position": 0, "tokens": len(state.generated)})
                state.generated = []
                self._begin_plan(state)
            else:
                self._begin_reasoning(state)
            return
        if ended:
            self._finish(state, "forced" if state.phase == ANSWER else FINISH_EOS)
            return
        if stop is not None and stop.kind == "paused":
            state.limit -= len(new)
            return
        if state.phase == PLAN:
            state.actions[-1]["tokens"] = len(new)
            self._begin_reasoning(state)
        elif state.phase == REASON:
            if stop is not None and stop.kind == "rejected":
                self._cut_for_rewrite(state, stop.rejected, "step_check", stop.alarm.position)
            elif stop is not None and stop.kind == "alarm":
                self._act(state, stop.alarm)
            else:
                self._finish(state, "budget")
        elif state.phase == FP16_SPAN:
            rewrite, state.to_break = state.to_break, False
            if (self.control.fallback_span or rewrite) and len(state.generated) < self.sampling.budget:
                state.actions.append({"kind": "handback", "position": len(state.generated)})
                self._begin_reasoning(state)
            else:
                self._finish(state, "budget")
        elif state.phase == ANSWER:
            self._finish(state, "budget")

    def _act(self, state: TraceState, alarm: Alarm) -> None:
        if alarm.span_to_break:
            self._rewrite_step(state, alarm)
            return
        onset = max(0, min(alarm.onset, len(state.generated)))
        kept = state.generated[:onset]
        candidates = find_candidate_answers(self.tokenizer.decode(kept, skip_special_tokens=True))
        ends = token_char_ends(self.tokenizer, kept) if candidates else []
        candidate_tokens = [min(bisect.bisect_left(ends, c.end), len(ends) - 1) for c in candidates]
        action, chosen = self.trigger.select(state.index, alarm, candidate_tokens, self.control.on_alarm,
                                             "fp16" in self.models)
        state.interventions += 1
        record = {"kind": action, "reason": alarm.reason, "position": alarm.position, "onset": onset,
                  "policy": self.trigger.policy_name}
        state.actions.append(record)
        if action == COMMIT:
            if chosen is not None:
                record["answer"] = candidates[chosen].text
                forced = self._encode(self.control.commit_template.format(answer=candidates[chosen].text))
                state.generated.extend(forced + [self.tokenizer.eos_token_id])
                state.tokens["forced"] += len(forced) + 1
                self._finish(state, "forced")
            else:
                forced = self._encode(self.control.commit_open)
                state.generated.extend(forced)
                state.tokens["forced"] += len(forced)
                state.answer_model = "2bit"
                state.phase, state.limit = ANSWER, self.control.answer_tokens
        else:
            record["cut_tokens"] = len(state.generated) - onset
            state.generated = state.generated[:onset]
            state.phase = FP16_SPAN
            room = self.sampling.budget - len(state.generated)
            state.limit = min(room, self.control.fallback_span) if self.control.fallback_span else room
            if state.limit <= 0:
                self._finish(state, "budget")

    def _can_rewrite(self, state: TraceState, onset: int, length: int) -> bool:
        """Whether FP16 may check or rewrite the result beginning at `onset` of a trace `length` tokens long."""
        return ("fp16" in self.models and len(state.rewritten) < self.control.max_step_rewrites
                and self.sampling.budget - onset > 0 and 0 <= onset <= length and onset not in state.rewritten)

    def _rewrite_step(self, state: TraceState, alarm: Alarm) -> None:
        """Cut back to where the step's result begins; FP16 writes to the step's break, then hands back."""
        if not self._can_rewrite(state, alarm.onset, len(state.generated)):
            self._begin_reasoning(state)  # nothing to rewrite with: the 2-bit model goes on
            return
        state.rewritten.add(alarm.onset)
        self._cut_for_rewrite(state, alarm.onset, alarm.reason, alarm.position)

    def _cut_for_rewrite(self, state: TraceState, onset: int, reason: str, position: int) -> None:
        state.actions.append({"kind": "rewrite", "reason": reason, "position": position,
                              "onset": onset, "cut_tokens": len(state.generated) - onset,
                              "policy": self.trigger.policy_name})
        state.generated = state.generated[:onset]
        state.phase, state.to_break = FP16_SPAN, True
        state.limit = min(self.sampling.budget - onset, STEP_REWRITE_TOKENS)

    @torch.no_grad()
    def _check_results(self, sequences: list[list[int]], starts: list[int],
                       states: list[TraceState] | None = None) -> list[tuple[float, int | None, int]]:
        """FP16's reading of each sequence (prompt and trace): per sequence, the smallest FP16 probability
        (softmax at the sampling temperature) of its tokens from index `starts[i]` on, the index of the first
        of them below `rescue.step_check_min_prob` (None: all accepted), and how many tokens FP16 read.
        With `states` and `rescue.step_check_cache`, each sequence goes on from its trace's cache;
        otherwise all of them are read whole in one padded pass."""
        if states is not None and self.control.step_check_cache:
            return [self._check_cached(sequence, start, state)
                    for sequence, start, state in zip(sequences, starts, states)]
        model = self.models["fp16"]
        input_ids, mask = self._left_padded(sequences)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Logits of the last `keep` positions: every checked token is predicted from one of them.
        keep = max(len(q) - start for q, start in zip(sequences, starts)) + 1
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False,
                       logits_to_keep=keep).logits[:, -keep:].float()
        verdicts = []
        for row, (sequence, start) in enumerate(zip(sequences, starts)):
            # Token i of the sequence is predicted at kept index keep - (len - i) - 1.
            lowest, rejected = self._judge(logits[row], keep - (len(sequence) - start) - 1, sequence, start)
            verdicts.append((lowest, rejected, len(sequence)))
        return verdicts

    def _check_cached(self, sequence: list[int], start: int, state: TraceState) -> tuple[float, int | None, int]:
        """`_check_results` for one sequence, from `state`'s FP16 cache: the cache is cut back to the longest
        prefix it shares with the sequence (and to before `start`, whose prediction must be read), FP16
        reads the rest, and the cache then holds the whole sequence."""
        cache, begin = self._resume(state, "fp16", sequence, before=start)
        if cache is None:
            cache = DynamicCache()
        ids = torch.tensor([sequence[begin:]], device=self.device)
        positions = torch.arange(begin, len(sequence), device=self.device)[None]
        model = self.models["fp16"]
        keep = len(sequence) - start + 1  # logits of positions start - 1 .. the last: token start is read at 0
        logits = model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=keep,
                       **{cache_argument(model): cache}).logits[0, -keep:].float()
        self._hold(state, "fp16", list(sequence), cache)
        lowest, rejected = self._judge(logits, 0, sequence, start)
        return lowest, rejected, len(sequence) - begin

    def _judge(self, logits: torch.Tensor, first: int, sequence: list[int], start: int) -> tuple[float, int | None]:
        """(smallest probability, first rejected index) of tokens `start`.. of `sequence`, predicted by rows
        `first`.. of one sequence's `logits`."""
        probs = torch.softmax(logits[first:first + len(sequence) - start] / max(self.sampling.temperature, 1e-5),
                              dim=-1)
        chosen = torch.tensor(sequence[start:], device=probs.device)
        token_probs = probs[torch.arange(len(chosen), device=probs.device), chosen].tolist()
        checked = range(start, len(sequence))
        rejected = next((i for i, p in zip(checked, token_probs) if p < self.control.step_check_min_prob), None)
        return min(token_probs), rejected

    def _resume(self, state: TraceState, precision: str, sequence: list[int], before: int | None = None
                ) -> tuple[DynamicCache | None, int]:
        """`precision`'s held cache of `state` cut back to the longest prefix it shares with `sequence` (and to
        before index `before`, default the last token, whose prediction must be read), and that prefix's length;
        (None, 0) where nothing is held or shared."""
        entry = self._drop(state, precision)
        if entry is None:
            return None, 0
        ids, cache, _ = entry
        common = next((i for i, (a, b) in enumerate(zip(ids, sequence)) if a != b), min(len(ids), len(sequence)))
        begin = min(common, (len(sequence) if before is None else before) - 1)
        if begin <= 0:
            return None, 0
        if cache.get_seq_length() > begin:  # negative: tokens to remove (every transformers 5)
            cache.crop(begin - cache.get_seq_length())
        return cache, begin

    def _hold(self, state: TraceState, precision: str, ids: list[int], cache: DynamicCache) -> None:
        """Keep `cache` (of `ids`) for `state`'s next use of `precision`, unless all held caches would then pass
        `rescue.round_cache_gib`."""
        size = _cache_bytes(cache)
        if self._held_bytes + size <= self.control.round_cache_gib * 2**30:
            state.held[precision] = (ids, cache, size)
            self._held_bytes += size

    def _drop(self, state: TraceState, precision: str) -> tuple | None:
        """Take `precision`'s held cache entry (ids, cache, bytes) away from `state` (None: none held)."""
        entry = state.held.pop(precision, None)
        if entry is not None:
            self._held_bytes -= entry[2]
        return entry

    def _check_inline(self, batch: list[TraceState], alarms: dict, bases: list[int], new: list[list[int]],
                      stops: dict) -> None:
        """Step checks of this decoding step's checking alarms (see the module docstring): an accepted result
        drops its alarm, a rejected one stops its row (`rejected`); an alarm FP16 may not act on is dropped."""
        rows = [row for row, alarm in alarms.items() if alarm.span_to_break and alarm.check]
        wanted = []
        for row in rows:
            alarm, state = alarms.pop(row), batch[row]
            if state.phase == REASON and self._can_rewrite(state, alarm.onset, bases[row] + len(new[row]) - 1):
                wanted.append((row, alarm))
        if not wanted:
            return
        prompts = [len(batch[row].prompt_ids) for row, _ in wanted]
        sequences = [batch[row].prompt_ids + batch[row].generated + new[row] for row, _ in wanted]
        began = time.perf_counter()
        verdicts = self._check_results(sequences, [p + a.onset for p, (_, a) in zip(prompts, wanted)],
                                       [batch[row] for row, _ in wanted])
        share = (time.perf_counter() - began) / len(wanted)
        for (row, alarm), prompt, (lowest, rejected, read) in zip(wanted, prompts, verdicts):
            state = batch[row]
            state.rewritten.add(alarm.onset)
            state.prefill["fp16"] += read
            state.wall_seconds += share
            state.actions.append({"kind": "check", "reason": alarm.reason, "position": alarm.position,
                                  "onset": alarm.onset, "policy": self.trigger.policy_name,
                                  "min_prob": round(lowest, 4), "accepted": rejected is None})
            if rejected is not None:
                stops[row] = _Stop("rejected", alarm, rejected - prompt)

    def _left_padded(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids and attention mask of `sequences`, left-padded to the longest."""
        width = max(map(len, sequences))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(q)) + q for q in sequences], device=self.device)
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in sequences], device=self.device)
        return input_ids, mask

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- decoding -----------------------------------------------------------------------------------

    def run(self, problems: Sequence[Problem], progress: bool = True) -> list[TraceState]:
        states = []
        for index, problem in enumerate(problems):
            prompt = self.tokenizer(render_prompt(self.tokenizer, problem.question), add_special_tokens=False)
            states.append(TraceState(index, problem, list(prompt.input_ids), phase=REASON))
        generator = torch.Generator(device=self.device).manual_seed(self.sampling.seed)
        bar = tqdm(total=len(states), desc=self.method, unit="problem", disable=not progress, dynamic_ncols=True)
        done = started = 0
        limit = self.control.active_traces
        while True:
            pending = [s for s in states[:started] if s.phase != DONE]
            while started < len(states) and (not limit or len(pending) < limit):
                state = states[started]
                started += 1
                self._start(state)
                if state.phase != DONE:
                    pending.append(state)
            finished = sum(s.phase == DONE for s in states)
            bar.update(finished - done)
            done = finished
            if not pending:
                break
            for precision in ("2bit", "fp16"):
                group = [s for s in pending if s.model == precision and s.phase != DONE]
                for start in range(0, len(group), self.sampling.batch_size):
                    self._decode_batch(group[start : start + self.sampling.batch_size], precision, generator)
                    finished = sum(s.phase == DONE for s in states)
                    bar.update(finished - done)
                    done = finished
                    bar.set_postfix(actions=sum(len(s.actions) for s in states))
        bar.close()
        return states

    def _decode_batch(self, batch: list[TraceState], precision: str, generator: torch.Generator) -> None:
        model = self.models[precision]
        sequences = [s.prompt_ids + s.generated for s in batch]
        keep = self.control.round_cache
        resumed = [self._resume(state, precision, ids) if keep else (None, 0) for state, ids in zip(batch, sequences)]
        input_ids, mask = self._left_padded([ids[begin:] for ids, (_, begin) in zip(sequences, resumed)])
        pad = self.tokenizer.pad_token_id
        for state, ids, (_, begin) in zip(batch, sequences, resumed):
            state.prefill[precision] += len(ids) - begin
            state.passes[precision] += 1
        bases = [len(s.generated) for s in batch]
        watched = [s.phase in (PROBE, REASON) and self.think_close not in s.generated
                   and s.interventions < self.control.max_interventions for s in batch]
        planning = [s.phase == PLAN for s in batch]
        to_break = [s.phase == FP16_SPAN and s.to_break for s in batch]
        stops: dict[int, _Stop] = {}
        new: list[list[int]] = [[] for _ in batch]
        """The tokens each row has added in this batch."""

        def hook(view) -> torch.Tensor:
            rows = view.rows.tolist()
            tokens = view.tokens.tolist()
            stop = [False] * len(rows)
            observe_at, observe_rows = [], []
            for i, (row, token) in enumerate(zip(rows, tokens)):
                new[row].append(token)
                if token == self.think_close:
                    watched[row] = False
                if watched[row] and precision == "2bit":
                    observe_at.append(i)
                    observe_rows.append(row)
            alarms: dict[int, Alarm] = {}
            if observe_rows:
                index = torch.tensor(observe_at, device=view.tokens.device)
                seen = self.trigger.observe(
                    [batch[r].index for r in observe_rows], [bases[r] + len(new[r]) - 1 for r in observe_rows],
                    view.tokens[index], {k: v[index] for k, v in view.hidden.items()},
                    None if view.top_prob is None else view.top_prob[index])
                alarms = {row: alarm for row, alarm in zip(observe_rows, seen) if alarm is not None}
                self._check_inline(batch, alarms, bases, new, stops)
            for i, row in enumerate(rows):
                state = batch[row]
                if row in stops and stops[row].kind == "rejected":
                    stop[i] = True
                elif len(new[row]) >= state.limit or (to_break[row] and self._closes_step(tokens[i])):
                    stops[row], stop[i] = _Stop("limit"), True
                elif planning[row] and self._plan_complete(new[row]):
                    stops[row], stop[i] = _Stop("plan_done"), True
                elif row in alarms and state.phase == REASON:
                    stops[row], stop[i] = _Stop("alarm", alarms[row]), True
            live = [row for i, row in enumerate(rows) if not stop[i] and tokens[i] not in self.eos]
            waiting = sum(1 for s in stops.values() if s.kind in ("alarm", "rejected"))
            if waiting and waiting >= len(live):
                for i, row in enumerate(rows):
                    if row in live:
                        stops[row], stop[i] = _Stop("paused"), True
            return torch.tensor(stop, device=view.tokens.device)

        began = time.perf_counter()
        layers = self.trigger.layers if precision == "2bit" and any(watched) else ()
        result = generate(model, input_ids, mask, max_new_tokens=max(s.limit for s in batch), eos_token_ids=self.eos,
                          pad_token_id=pad, sampler=self.sampler, generator=generator, layers=layers, hook=hook,
                          decode=self.sampling.decode, past=[cache for cache, _ in resumed] if keep else None,
                          keep_cache=keep)
        share = (time.perf_counter() - began) / len(batch)
        for row, state in enumerate(batch):
            if keep:
                self._hold(state, precision, sequences[row] + result.generated_ids[row][:-1], result.caches[row])
            new = result.generated_ids[row][: state.limit]
            state.tokens[precision] += len(new)
            state.wall_seconds += share
            self._after_segment(state, new, stops.get(row))

    def _closes_step(self, token: int) -> bool:
        return any(c in BREAKS for c in self.tokenizer.decode([token], skip_special_tokens=True))

    def _plan_complete(self, tokens: list[int]) -> bool:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        body = text.lstrip()
        if body.startswith("<think>"):
            body = body[len("<think>"):]
        body = body.lstrip()
        return bool(body) and self.plan_stop in body


def _cache_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers if getattr(layer, "keys", None) is not None)
