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


@pytest.mark.parametrize("window_step", [None, 8])  # doubling only; doubling to 8, then 8 at a time
def test_windowed_static_steps_choose_the_dynamic_paths_greedy_tokens(model_and_batch, window_step):
    model, enc = model_and_batch
    prompt, new = enc.input_ids.shape[1], 40
    dynamic_tokens, dynamic_states = _greedy(DynamicSteps(model, [1], [1]), enc, new)
    windowed = StaticSteps(model, [1], [1], max_length=prompt + new + 200, min_window=4, window_step=window_step)
    windows = []
    original = windowed.window_for
    windowed.window_for = lambda slot: windows.append(original(slot)) or windows[-1]
    tokens, states = _greedy(windowed, enc, new)
    # The window grew through several powers of two and never reached the whole cache.
    assert len(set(windows)) >= 2 and max(windows) < windowed.max_length
    assert all(window > slot for window, slot in zip(windows, range(prompt, prompt + new)))
    if window_step:  # past 8 positions every window is the least multiple of 8 holding the slot
        assert all(window == (slot // 8 + 1) * 8 for window, slot in zip(windows, range(prompt, prompt + new)))
    assert torch.equal(tokens, dynamic_tokens)
    for ours, theirs in zip(states, dynamic_states):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_window_is_the_least_power_of_two_holding_every_written_slot(model_and_batch):
    model, _ = model_and_batch
    steps = StaticSteps(model, [], [], max_length=1000, min_window=256)
    assert [steps.window_for(slot) for slot in (0, 255, 256, 511, 512, 999)] == [256, 256, 512, 512, 1000, 1000]
    whole = StaticSteps(model, [], [], max_length=1000, windowed=False)
    assert whole.window_for(3) == 1000


def test_past_window_step_the_window_grows_by_that_many_positions_unless_compiled(model_and_batch):
    model, _ = model_and_batch
    slots = (1023, 1024, 2047, 2048, 3072, 4999)
    steps = StaticSteps(model, [], [], max_length=5000)
    assert steps.window_step == 1024
    assert [steps.window_for(slot) for slot in slots] == [1024, 2048, 2048, 3072, 4096, 5000]
    compiled = StaticSteps(model, [], [], max_length=5000, compile=True)  # each window a compile: doubling
    assert [compiled.window_for(slot) for slot in slots] == [1024, 2048, 2048, 4096, 4096, 5120]


def test_compiled_steps_of_one_batch_size_compile_once_across_prompt_lengths_and_budgets(monkeypatch):
    """The controller's rounds: the same rows, other prompt lengths and budgets, one compile of the decode step."""
    import torch._dynamo.testing
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import inference.decoding.steps as steps
    from inference.decoding.generate import generate

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         attn_implementation="sdpa")
    model = Qwen3ForCausalLM(config).eval()
    counter = torch._dynamo.testing.CompileCounter()
    monkeypatch.setattr(steps, "COMPILE_BACKEND", counter)
    monkeypatch.setattr(steps, "_COMPILED", None)
    compiles = []
    for prompt, budget in ((7, 12), (11, 12), (9, 20)):
        ids = torch.randint(1, 64, (3, prompt), generator=torch.Generator().manual_seed(prompt))
        mask = torch.ones_like(ids)
        run = lambda decode: generate(model, ids, mask, max_new_tokens=budget, eos_token_ids=[], pad_token_id=0,
                                      decode=decode).generated_ids
        assert run("compiled") == run("static")
        compiles.append(counter.frame_count)
    assert compiles[0] >= 1 and compiles == [compiles[0]] * 3  # cache lengths 19-29, all in one bucket of 256
    monkeypatch.setattr(steps, "_COMPILED", None)
    torch._dynamo.reset()
