"""A bf16/fp16 model's q/k/v and gate/up projections as one matmul each (GroupedLinear), on the CPU."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference.decoding import kernels
from inference.decoding.generate import generate
from inference.prompts import render_prompt


@pytest.fixture()
def model_and_tokenizer(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_grouped_linear_gives_each_members_product_and_shares_their_weights():
    torch.manual_seed(0)
    members = [nn.Linear(32, n, bias=True) for n in (48, 16, 16)]
    x = torch.randn(5, 32)
    expected = [member(x) for member in members]
    grouped = kernels.GroupedLinear(members)
    parts = grouped(x)

    for part, want, member in zip(parts, expected, members):
        torch.testing.assert_close(part, want)
        torch.testing.assert_close(member(x), want)  # the members still answer alone, from the group's rows
        assert member.weight.untyped_storage().data_ptr() == grouped.weight.untyped_storage().data_ptr()
    assert grouped.weight.shape == (80, 32)


def test_grouped_linear_refuses_members_it_cannot_concatenate():
    with pytest.raises(ValueError, match="in_features or dtype"):
        kernels.GroupedLinear([nn.Linear(32, 16), nn.Linear(64, 16)])
    with pytest.raises(ValueError, match="in_features or dtype"):
        kernels.GroupedLinear([nn.Linear(32, 16), nn.Linear(32, 16, dtype=torch.float16)])
    with pytest.raises(ValueError, match="bias"):
        kernels.GroupedLinear([nn.Linear(32, 16), nn.Linear(32, 16, bias=False)])
    with pytest.raises(ValueError, match="nn.Linear members"):
        kernels.GroupedLinear([nn.Linear(32, 16), nn.Identity()])


def test_grouped_projections_keep_the_models_logits_in_two_matmuls_fewer_a_layer(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer([render_prompt(tokenizer, "What is 2 + 3?")], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    layers = len(model.model.layers)

    assert kernels.group_linear_projections(model) == 2 * layers
    assert isinstance(model.model.layers[0].self_attn.k_proj, kernels.GroupedMember)
    calls = []
    real = nn.functional.linear
    monkeypatch.setattr(nn.functional, "linear", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    with torch.no_grad():
        grouped = model(ids).logits
    torch.testing.assert_close(grouped, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 4 * layers + 1  # q/k/v, o, gate/up, down a layer, and the output head
    run = model.model.layers[0].self_attn.q_proj.run
    assert run.input is None and run.parts == ()  # v, the last member, let the parts go

    assert kernels.ungroup_projections(model) == 5 * layers
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 7 * layers + 1


@pytest.mark.parametrize("decode", ["static", "compiled"])
def test_grouped_projections_choose_the_dynamic_paths_greedy_tokens(model_and_tokenizer, decode):
    model, tokenizer = model_and_tokenizer
    prompts = [render_prompt(tokenizer, q) for q in ("What is 2 + 3?", "Start with 17. Add 8, multiply by 3.")]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")

    def tokens(mode):
        return generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=12,
                        eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, layers=[-1],
                        hook=lambda view: None, decode=mode).generated_ids

    expected = tokens("dynamic")
    kernels.group_linear_projections(model)
    assert tokens(decode) == expected


def test_full_precision_model_loads_grouped_where_the_config_asks(tiny_model_dir):
    from inference.config import load_config
    from inference.decoding.models import load_full_precision

    apart, _ = load_full_precision(str(tiny_model_dir), dtype="float32", device="cpu")
    grouped, _ = load_full_precision(str(tiny_model_dir), dtype="float32", device="cpu", grouped=True)
    members = [m for m in grouped.modules() if isinstance(m, kernels.GroupedMember)]
    assert len(members) == 5 * grouped.config.num_hidden_layers
    assert not any(isinstance(m, kernels.GroupedMember) for m in apart.modules())
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    torch.testing.assert_close(grouped(input_ids=ids).logits, apart(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    assert load_config("qwen3-8b").model.fp16_grouped  # the GPU configs group, the embedded ones do not
    assert not load_config("tiny-m").model.fp16_grouped
    assert load_config("tiny-m", {"model.fp16_grouped": True}).model.fp16_grouped
