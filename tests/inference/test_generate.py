from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference.decoding.generate import FINISH_BUDGET, FINISH_EOS, Sampler, generate
from inference.prompts import render_prompt


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


def _batch(tokenizer, questions):
    prompts = [render_prompt(tokenizer, q) for q in questions]
    return tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")


def _keep_views(seen):
    """A hook that keeps what every step's view shows (a view is read inside its hook)."""
    return lambda view: seen.append(SimpleNamespace(step=view.step, rows=view.rows, tokens=view.tokens,
                                                    hidden=view.hidden, top_prob=view.top_prob, scores=view.scores))


def test_greedy_matches_model_generate_on_left_padded_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    enc = _batch(tokenizer, ["What is 2 + 3?", "Start with 17. Add 8, multiply by 3."])
    assert (enc.attention_mask == 0).any(), "the batch must actually be left-padded"
    ours = generate(
        model, enc.input_ids, enc.attention_mask, max_new_tokens=24,
        eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
    )
    reference = model.generate(
        **enc, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    for row, ids in enumerate(ours.generated_ids):
        expected = reference[row, enc.input_ids.shape[1]:].tolist()
        assert ids == expected[: len(ids)]
        assert len(ids) == 24 or ids[-1] == tokenizer.eos_token_id


def test_hook_sees_live_sequences_and_hidden_states_of_the_same_forward(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    enc = _batch(tokenizer, ["What is 2 + 3?", "What is 7 * 6?", "Add 1 and 1."])
    seen = []
    result = generate(
        model, enc.input_ids, enc.attention_mask, max_new_tokens=6,
        eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
        layers=[0, -1], hook=_keep_views(seen),
    )
    assert [view.step for view in seen] == list(range(6))
    for view in seen:
        assert view.rows.tolist() == [0, 1, 2]
        assert set(view.hidden) == {0, -1}
        assert view.hidden[-1].shape == (3, model.config.hidden_size)
    # Replaying prompt + generated tokens in one pass gives the hidden states the hook saw.
    full = torch.cat([enc.input_ids, torch.tensor(result.generated_ids)], dim=1)
    mask = torch.cat([enc.attention_mask, torch.ones(3, 6, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        states = model(input_ids=full, attention_mask=mask, position_ids=positions, output_hidden_states=True).hidden_states
    prompt_len = enc.input_ids.shape[1]
    for view in seen:
        position = prompt_len + view.step - 1
        torch.testing.assert_close(view.hidden[0], states[1][:, position], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(view.hidden[-1], states[-1][:, position], rtol=1e-4, atol=1e-4)
        assert view.tokens.tolist() == [ids[view.step] for ids in result.generated_ids]


def test_sequences_stop_independently_at_eos_or_budget(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    enc = _batch(tokenizer, ["What is 2 + 3?", "What is 7 * 6?"])
    # Make the model's first choice for row 0 an EOS by declaring that token an EOS id.
    first = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=1,
                     eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    stop_token = first.generated_ids[0][0]
    live_rows = []
    result = generate(
        model, enc.input_ids, enc.attention_mask, max_new_tokens=5, eos_token_ids=[stop_token],
        pad_token_id=tokenizer.pad_token_id, hook=lambda v: live_rows.append(v.rows.tolist()),
    )
    assert result.finish_reasons[0] == FINISH_EOS and result.generated_ids[0] == [stop_token]
    if stop_token not in result.generated_ids[1]:
        assert result.finish_reasons[1] == FINISH_BUDGET and len(result.generated_ids[1]) == 5
        assert live_rows[0] == [0, 1] and all(rows == [1] for rows in live_rows[1:])


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    enc = _batch(tokenizer, ["What is 2 + 3?"] * 2)
    sampler = Sampler(temperature=1.0, top_k=20, top_p=0.95)

    def run(seed):
        return generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=16,
                        eos_token_ids=[], pad_token_id=tokenizer.pad_token_id, sampler=sampler,
                        generator=torch.Generator().manual_seed(seed)).generated_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.6, 20, 0.95), (1.0, 20, 1.0), (0.7, 5, 0.5)])
def test_top_k_sampling_over_a_large_vocabulary_keeps_the_warpers_distribution(temperature, top_k, top_p):
    """On 151,936 scores, the candidates' probabilities are transformers' warpers' over the whole vocabulary,
    the scores tied with the k-th included (bf16 logits tie often). Which of several tokens tied exactly at
    the top-p boundary is dropped is arbitrary in either path, so no row here puts a tie there."""
    from inference.decoding.generate import TIE_MARGIN

    sampler = Sampler(temperature, top_k, top_p)
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 151_936, generator=generator) * 3).to(torch.bfloat16).float()
    logits[1, :top_k - 1] = 40.0 + 0.5 * torch.arange(top_k - 1)
    logits[1, top_k - 1:top_k + 3] = 38.0  # four tokens tied at the k-th score: TopK keeps all four
    logits[2, :3] = torch.tensor([30.0, 29.0, 28.5])
    full = torch.softmax(sampler._warpers(None, logits.clone()), dim=-1)
    scores, indices = sampler.candidates(logits)
    few = torch.zeros_like(full).scatter_(1, indices, torch.softmax(scores, dim=-1))
    assert torch.equal(few > 0, full > 0)
    torch.testing.assert_close(few, full, rtol=1e-5, atol=1e-7)
    if top_p == 1.0:
        assert int((full[1] > 0).sum()) == top_k + 3
    # Draws land on kept tokens only, and seeded draws repeat.
    draws = torch.stack([sampler.choose(logits, torch.Generator().manual_seed(seed)) for seed in range(30)])
    assert bool((full.gather(1, draws.T) > 0).all())
    assert torch.equal(sampler.choose(logits, torch.Generator().manual_seed(3)), draws[3])
    # A tie with the k-th score that runs past the margin: no candidates, the whole vocabulary is used.
    logits[3, :top_k + TIE_MARGIN + 1] = logits[3].max() + 1.0
    assert sampler.candidates(logits) is None
    chosen = sampler.choose(logits, torch.Generator().manual_seed(0))
    assert bool((torch.softmax(sampler._warpers(None, logits.clone()), dim=-1).gather(1, chosen[:, None]) > 0).all())


def test_zero_budget_is_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    enc = _batch(tokenizer, ["What is 2 + 3?"])
    with pytest.raises(ValueError, match="positive integer"):
        generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=0, eos_token_ids=[1], pad_token_id=0)


def test_hook_can_stop_single_rows_while_the_rest_goes_on(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    enc = _batch(tokenizer, ["What is 2 + 3?", "What is 7 * 6?", "Add 1 and 1."])
    seen = []

    def stop_middle_row_at_step_2(view):
        seen.append((view.step, view.rows.tolist(), view.top_prob))
        return (view.rows == 1) & torch.tensor(view.step == 2)

    result = generate(
        model, enc.input_ids, enc.attention_mask, max_new_tokens=6,
        eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, hook=stop_middle_row_at_step_2,
        top_prob=True,
    )
    assert result.finish_reasons[1] == "stopped" and len(result.generated_ids[1]) == 3
    assert [rows for step, rows, _ in seen if step > 2] == [[0, 2]] * 3
    assert all(((p > 0) & (p <= 1)).all() for _, _, p in seen)
    # The stopped row's tokens are those an unstopped run chooses (greedy).
    plain = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=6,
                     eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    assert result.generated_ids[1] == plain.generated_ids[1][:3]
    assert result.generated_ids[0] == plain.generated_ids[0]


def _grid_draws(sampler, logits, count):
    """How often `Sampler.draw` picks each token of every row over `count` evenly spaced uniforms."""
    rows, vocab = logits.shape
    scores, indices, _ = sampler._draw_scores(logits.float())
    uniforms = (torch.arange(count) + 0.5) / count
    picked = sampler._pick(scores.repeat_interleave(count, 0),
                           None if indices is None else indices.repeat_interleave(count, 0), uniforms.repeat(rows))
    counts = torch.zeros(rows, vocab).scatter_add_(1, picked.view(rows, count), torch.ones(rows, count))
    return counts / count


@pytest.mark.parametrize("vocab,temperature,top_k,top_p", [(151_936, 0.6, 20, 0.95), (151_936, 1.0, 20, 1.0),
                                                           (500, 0.7, 0, 0.9), (500, 1.0, 5, 0.5)])
def test_the_steps_draw_keeps_the_warpers_distribution(vocab, temperature, top_k, top_p):
    """The graph-safe draw (inverse CDF at given uniforms) lands on exactly the tokens the warpers keep, as
    often as their probabilities say: on candidates (Qwen3's vocabulary with top-k) and on the whole vocabulary.
    float32 scores, so that no two tie at the top-p boundary, where which one is dropped is arbitrary."""
    sampler = Sampler(temperature, top_k, top_p)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=generator) * 3
    logits[1, :3] = torch.tensor([30.0, 29.0, 28.5])
    full = torch.softmax(sampler._warpers(None, logits.clone()), dim=-1)
    share = _grid_draws(sampler, logits, 20_000)
    assert not bool(((share > 0) & (full == 0)).any())
    torch.testing.assert_close(share, full, rtol=0, atol=2 / 20_000)
    # A uniform just below 1 still lands on a kept token; no draw of these needs redoing.
    tokens, redo = sampler.draw(logits, torch.full((3,), 1 - 2 ** -24))
    assert bool((full.gather(1, tokens[:, None]) > 0).all())
    assert redo is None if not sampler._few(vocab) else not bool(redo.any())


def test_the_steps_draw_flags_a_tie_past_the_candidates_and_is_greedy_at_temperature_zero():
    from inference.decoding.generate import TIE_MARGIN

    logits = torch.randn(3, 151_936, generator=torch.Generator().manual_seed(1))
    logits[1, :20 + TIE_MARGIN + 4] = 50.0  # more tokens tied at the k-th score than the candidates hold
    tokens, redo = Sampler(0.6, 20, 0.95).draw(logits, torch.full((3,), 0.5))
    assert redo.tolist() == [False, True, False]
    assert Sampler(0.6, 20, 0.95).candidates(logits) is None  # `choose` takes the whole vocabulary then
    greedy, none = Sampler().draw(logits, None)
    assert torch.equal(greedy, logits.argmax(-1)) and none is None


def test_the_static_path_draws_in_the_step_and_redoes_a_flagged_draw(model_and_tokenizer):
    """On the static path the step draws the tokens (seeded runs repeat, other seeds differ); a draw the step
    flags is chosen again by `Sampler.choose`, as the loop did before the draw moved into the step."""
    from inference.decoding import generate as generate_module

    model, tokenizer = model_and_tokenizer
    enc = _batch(tokenizer, ["What is 2 + 3?", "What is 7 * 6?"])
    sampler = Sampler(temperature=1.0, top_k=20, top_p=0.95)
    drawn = []

    def run(seed, decode="static", chosen=sampler):
        return generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=12, eos_token_ids=[],
                        pad_token_id=tokenizer.pad_token_id, sampler=chosen, decode=decode,
                        generator=torch.Generator().manual_seed(seed),
                        hook=lambda view: drawn.append(view.outputs.tokens is not None)).generated_ids

    assert run(1) == run(1) and run(1) != run(2)
    assert all(drawn)

    class Flagged(Sampler):
        """Greedy through `choose`, while the step's draw is wrong and flagged on every row."""

        def draw(self, logits, uniforms):
            return torch.zeros(logits.shape[0], dtype=torch.long), torch.ones(logits.shape[0], dtype=torch.bool)

    greedy = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=12, eos_token_ids=[],
                      pad_token_id=tokenizer.pad_token_id, decode="dynamic").generated_ids
    assert run(0, chosen=Flagged()) == greedy
    generate_module.DRAW_IN_STEP = False
    try:
        drawn.clear()
        assert run(0, chosen=Flagged()) == greedy and not any(drawn)
    finally:
        generate_module.DRAW_IN_STEP = True


def test_static_path_chooses_the_tokens_and_states_of_the_dynamic_path(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    enc = _batch(tokenizer, ["What is 2 + 3?", "Start with 17. Add 8, multiply by 3.", "Add 1 and 1."])
    assert (enc.attention_mask == 0).any(), "the batch must actually be left-padded"
    runs = {}
    for decode in ("dynamic", "static"):
        views = []
        result = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=20,
                          eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                          layers=[0, -1], hook=_keep_views(views), decode=decode,
                          probe=lambda hidden: hidden[-1].sum(dim=-1))
        runs[decode] = (result, views)
    (dynamic, dynamic_views), (static, static_views) = runs["dynamic"], runs["static"]
    assert static.generated_ids == dynamic.generated_ids
    assert static.finish_reasons == dynamic.finish_reasons
    assert len(static_views) == len(dynamic_views) == 20
    for ours, theirs in zip(static_views, dynamic_views):
        torch.testing.assert_close(ours.hidden[-1], theirs.hidden[-1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.scores, ours.hidden[-1].sum(dim=-1))


def test_a_view_is_read_inside_its_hook(model_and_tokenizer):
    """The static path reuses a step's outputs for the next step, so a view's fields not read while its
    hook ran are refused afterwards; what the hook did read stays the hook's."""
    model, tokenizer = model_and_tokenizer
    enc = _batch(tokenizer, ["What is 2 + 3?", "What is 7 * 6?"])
    kept = []
    generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=3, eos_token_ids=[],
             pad_token_id=tokenizer.pad_token_id, layers=[-1], hook=lambda view: kept.append((view, view.hidden)),
             top_prob=True, decode="static")
    view, hidden = kept[0]
    assert view.hidden is hidden and hidden[-1].shape == (2, model.config.hidden_size)
    with pytest.raises(RuntimeError, match="StepView.top_prob of step 0 was first read after the hook returned"):
        _ = view.top_prob


def test_compiled_path_chooses_the_tokens_of_the_dynamic_path(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    enc = _batch(tokenizer, ["What is 2 + 3?", "Start with 17. Add 8, multiply by 3."])
    runs = [generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=12,
                     eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, layers=[-1],
                     hook=lambda view: None, decode=decode).generated_ids for decode in ("dynamic", "compiled")]
    assert runs[0] == runs[1]


def test_static_path_stops_rows_like_the_dynamic_path(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    enc = _batch(tokenizer, ["What is 2 + 3?", "What is 7 * 6?"])
    results = [generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=8,
                        eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                        hook=lambda view: (view.rows == 0) & torch.tensor(view.step == 3), decode=decode)
               for decode in ("dynamic", "static")]
    assert results[0].generated_ids == results[1].generated_ids
    assert results[1].finish_reasons[0] == "stopped" and len(results[1].generated_ids[0]) == 4


def test_unknown_decode_path_is_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    enc = _batch(tokenizer, ["What is 2 + 3?"])
    with pytest.raises(ValueError, match="decode must be one of dynamic, static, compiled"):
        generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=2, eos_token_ids=[1], pad_token_id=0,
                 decode="graph")


def _left_padded(sequences, pad):
    width = max(map(len, sequences))
    ids = torch.tensor([[pad] * (width - len(q)) + q for q in sequences])
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in sequences])
    return ids, mask


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_a_kept_cache_goes_on_as_the_whole_sequence_read_again(model_and_tokenizer, decode):
    """A batch resumed from the caches the last batch kept (cut back at different points per row, one row with
    none) chooses the tokens and watched states of the same batch prefilled whole."""
    model, tokenizer = model_and_tokenizer
    pad, eos = tokenizer.pad_token_id, [tokenizer.eos_token_id]
    enc = _batch(tokenizer, ["What is 2 + 3?", "Start with 17. Add 8, multiply by 3.", "Add 1 and 1."])
    first = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=10, eos_token_ids=[-1],
                     pad_token_id=pad, decode=decode, keep_cache=True)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(enc.input_ids, enc.attention_mask)]
    fed = [prompt + ids[:-1] for prompt, ids in zip(prompts, first.generated_ids)]
    assert [cache.get_seq_length() for cache in first.caches] == [len(q) for q in fed]
    # Row 0 goes on after all it fed plus its last token and two more; row 1 is cut back 4 tokens and given
    # others; row 2 starts from nothing.
    extra = tokenizer.encode(" so", add_special_tokens=False)
    sequences = [fed[0] + first.generated_ids[0][-1:] + extra * 2, fed[1][:-4] + extra, prompts[2] + extra]
    kept = [len(fed[0]), len(fed[1]) - 4, 0]
    caches = list(first.caches)
    caches[1].crop(-4)
    caches[2] = None
    ids, mask = _left_padded([q[k:] for q, k in zip(sequences, kept)], pad)
    seen_resumed, seen_whole = [], []
    resumed = generate(model, ids, mask, max_new_tokens=8, eos_token_ids=eos, pad_token_id=pad, decode=decode,
                       past=caches, layers=[-1], hook=_keep_views(seen_resumed), keep_cache=True)
    ids, mask = _left_padded(sequences, pad)
    whole = generate(model, ids, mask, max_new_tokens=8, eos_token_ids=eos, pad_token_id=pad, decode=decode,
                     layers=[-1], hook=_keep_views(seen_whole))
    assert resumed.generated_ids == whole.generated_ids
    for a, b in zip(seen_resumed, seen_whole):
        assert torch.allclose(a.hidden[-1], b.hidden[-1], atol=1e-4)
    assert [cache.get_seq_length() for cache in resumed.caches] == [
        len(q) + len(g) - 1 for q, g in zip(sequences, resumed.generated_ids)]


def test_past_must_match_the_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    enc = _batch(tokenizer, ["What is 2 + 3?"])
    with pytest.raises(ValueError, match="past has 2 caches for a batch of 1"):
        generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=2, eos_token_ids=[0],
                 pad_token_id=tokenizer.pad_token_id, past=[None, None])
