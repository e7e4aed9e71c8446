import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference.decoding.steps import DynamicSteps, StaticSteps
from inference.prompts import render_prompt


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [render_prompt(tokenizer, q) for q in ["What is 2 + 3?", "Start with 17. Add 8, multiply by 3."]]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert (enc.attention_mask == 0).any(), "the batch must actually be left-padded"
    return model, enc


def _greedy(steps, enc, new_tokens: int):
    """Greedy tokens and last-layer states of `new_tokens` decode steps through a stepper."""
    mask = enc.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = steps.prefill(enc.input_ids, mask, positions)
        position = positions[:, -1:]
        tokens, states = [], []
        for _ in range(new_tokens):
            token = out.logits.argmax(dim=-1)
            tokens.append(token)
            position = position + 1
            out = steps.step(token, position)
            states.append(out.hidden[1].clone())
    return torch.stack(tokens, dim=1), states


def test_windowed_static_steps_choose_the_dynamic_paths_greedy_tokens(model_and_batch):
    model, enc = model_and_batch
    prompt, new = enc.input_ids.shape[1], 40
    dynamic_tokens, dynamic_states = _greedy(DynamicSteps(model, [1], [1]), enc, new)
    windowed = StaticSteps(model, [1], [1], max_length=prompt + new + 200, min_window=4)
    windows = []
    original = windowed.window_for
    windowed.window_for = lambda slot: windows.append(original(slot)) or windows[-1]
    tokens, states = _greedy(windowed, enc, new)
    # The window grew through several powers of two and never reached the whole cache.
    assert len(set(windows)) >= 2 and max(windows) < windowed.max_length
    assert all(window > slot for window, slot in zip(windows, range(prompt, prompt + new)))
    assert torch.equal(tokens, dynamic_tokens)
    for ours, theirs in zip(states, dynamic_states):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_window_is_the_least_power_of_two_holding_every_written_slot(model_and_batch):
    model, _ = model_and_batch
    steps = StaticSteps(model, [], [], max_length=1000, min_window=256)
    assert [steps.window_for(slot) for slot in (0, 255, 256, 511, 512, 999)] == [256, 256, 512, 512, 1000, 1000]
    whole = StaticSteps(model, [], [], max_length=1000, windowed=False)
    assert whole.window_for(3) == 1000
