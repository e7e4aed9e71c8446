"""`quantize_model` on a tiny random Qwen3 (CPU, seconds): which linears GPTQ quantizes, and loading the result."""

import json

import pytest
import torch
from safetensors.torch import load_file

from inference.config import QuantizationConfig
from inference.decoding.quantize import quantize_model
from inference.errors import RescueError

CALIBRATION = [f"<think>\n{a} + {b} = {a + b}\n</think>\n\nThe answer is \\boxed{{{a + b}}}." for a, b in
               [(2, 3), (7, 6), (10, 4), (9, 9), (12, 30), (5, 8), (41, 1), (3, 3)]]


def stored_tensors(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def attention_only_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with its attention quantized to 2 bits and its MLPs kept in full precision."""
    out = tmp_path_factory.mktemp("keep-fp16") / "attn-2bit"
    settings = QuantizationConfig(bits=2, group_size=32, keep_fp16=["mlp"])
    summary = quantize_model(str(tiny_model_dir), out, CALIBRATION, settings, device="cpu")
    assert summary["kept_fp16"] == [f"model.layers.{i}.mlp.{name}_proj" for i in (0, 1)
                                    for name in ("gate", "up", "down")]
    return out


def test_keep_fp16_leaves_the_mlps_unquantized_and_quantizes_attention(attention_only_dir, tiny_model_dir):
    original = stored_tensors(tiny_model_dir)
    stored = stored_tensors(attention_only_dir)
    for layer in (0, 1):
        for name in ("gate", "up", "down"):
            prefix = f"model.layers.{layer}.mlp.{name}_proj"
            assert f"{prefix}.qweight" not in stored
            weight = stored[f"{prefix}.weight"]
            # GPTQModel keeps unquantized tensors in the dtype it quantized in (bfloat16 on the CPU).
            assert torch.equal(weight, original[f"{prefix}.weight"].to(weight.dtype))
        for name in ("q", "k", "v", "o"):
            prefix = f"model.layers.{layer}.self_attn.{name}_proj"
            assert f"{prefix}.qweight" in stored and f"{prefix}.weight" not in stored
    settings = json.loads((attention_only_dir / "quantize_config.json").read_text())
    assert settings["bits"] == 2 and settings["dynamic"] == {"-:.*(?:mlp)": {}}


def test_attention_only_2bit_model_loads_and_generates(attention_only_dir, tiny_model_dir):
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    from inference.decoding.generate import generate
    from inference.decoding.models import load_full_precision, load_quantized
    from inference.prompts import render_prompt

    packed, tokenizer = load_quantized(str(attention_only_dir), "cpu", kernel="gptq")
    layer = packed.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, TorchLinear) and type(layer.mlp.up_proj) is torch.nn.Linear

    plain, _ = load_quantized(str(attention_only_dir), "cpu", kernel="dequantized")
    full, _ = load_full_precision(str(tiny_model_dir), device="cpu")
    assert not any(isinstance(m, TorchLinear) for m in plain.modules())
    kept, original = plain.model.layers[1].mlp.down_proj.weight, full.model.layers[1].mlp.down_proj.weight
    assert torch.equal(kept, original.to(torch.bfloat16).float())
    assert not torch.allclose(plain.model.layers[1].self_attn.o_proj.weight,
                              full.model.layers[1].self_attn.o_proj.weight, atol=1e-3)

    enc = tokenizer([render_prompt(tokenizer, "What is 2 + 3?")], return_tensors="pt")
    with torch.no_grad():
        a, b = packed(**enc).logits.float(), plain(**enc).logits.float()
    assert torch.allclose(a, b, atol=0.05 * b.abs().max().item())
    result = generate(plain, enc.input_ids, enc.attention_mask, max_new_tokens=5,
                      eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    assert len(result.generated_ids[0]) >= 1


@pytest.mark.parametrize("keep, message", [
    (["mpl"], "quantization.keep_fp16: 'mpl' matches no linear of"),
    (["mlp", "self_attn"], "keeps every linear of"),
])
def test_keep_fp16_that_names_nothing_or_everything_is_refused(tmp_path, tiny_model_dir, keep, message):
    out = tmp_path / "never"
    with pytest.raises(RescueError, match=message):
        quantize_model(str(tiny_model_dir), out, CALIBRATION, QuantizationConfig(keep_fp16=keep), device="cpu")
    assert not out.exists() and not out.with_name("never.partial").exists()


def test_wider_quantizes_the_named_linears_to_more_bits_and_the_result_loads(tmp_path, tiny_model_dir):
    # Mixed precision: attention at 2 bits, MLPs at 4 bits, the first layer's up_proj kept in full
    # precision (keep_fp16 wins where both match). The widths travel in quantize_config.json.
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    from inference.decoding.models import load_quantized

    out = tmp_path / "mixed"
    settings = QuantizationConfig(bits=2, group_size=32, wider=["mlp"], wider_bits=4,
                                  keep_fp16=[r"layers\.0\.mlp\.up"])
    summary = quantize_model(str(tiny_model_dir), out, CALIBRATION, settings, device="cpu")
    assert summary["kept_fp16"] == ["model.layers.0.mlp.up_proj"]
    assert summary["wider"] == [f"model.layers.{i}.mlp.{name}_proj" for i in (0, 1)
                                for name in ("gate", "up", "down") if (i, name) != (0, "up")]
    stored = stored_tensors(out)
    assert "model.layers.0.mlp.up_proj.weight" in stored
    # A packed int32 word holds 32 / bits codes: 4-bit rows pack twice as many words as 2-bit rows.
    down, o = stored["model.layers.1.mlp.down_proj.qweight"], stored["model.layers.1.self_attn.o_proj.qweight"]
    down_in, o_in = stored["model.layers.1.mlp.down_proj.g_idx"].numel(), stored["model.layers.1.self_attn.o_proj.g_idx"].numel()
    assert down.shape[0] == down_in * 4 // 32 and o.shape[0] == o_in * 2 // 32
    model, _ = load_quantized(str(out), "cpu", kernel="gptq")
    layer = model.model.layers[1]
    assert layer.mlp.down_proj.bits == 4 and layer.self_attn.o_proj.bits == 2
    assert isinstance(layer.mlp.gate_proj, TorchLinear) and type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    plain, _ = load_quantized(str(out), "cpu", kernel="dequantized")
    assert torch.isfinite(plain(torch.tensor([[1, 2, 3]])).logits).all()


def test_wider_that_names_nothing_is_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "never"
    with pytest.raises(RescueError, match="quantization.wider: 'mpl' matches no linear of"):
        quantize_model(str(tiny_model_dir), out, CALIBRATION, QuantizationConfig(wider=["mpl"]), device="cpu")
    assert not out.exists()


@pytest.mark.parametrize("group_size, desc_act", [(-1, False), (-1, True), (32, True)])
def test_per_channel_2bit_quantizes_and_loads(tmp_path, tiny_model_dir, group_size, desc_act):
    # group_size -1 (one scale per output row) is a documented setting; GPTQModel's default
    # group-aware act-order used to refuse it. act-order (desc_act) must keep working beside it.
    from inference.decoding.models import load_quantized

    settings = QuantizationConfig(bits=2, group_size=group_size, desc_act=desc_act)
    quantize_model(str(tiny_model_dir), tmp_path / "pc", CALIBRATION, settings, device="cpu")
    stored = stored_tensors(tmp_path / "pc")
    down_in = stored["model.layers.0.mlp.down_proj.g_idx"].numel()
    groups = 1 if group_size == -1 else down_in // group_size  # -1: one group over all input columns
    assert stored["model.layers.0.mlp.down_proj.scales"].shape[0] == groups
    assert json.loads((tmp_path / "pc" / "quantize_config.json").read_text())["group_size"] == group_size
    model, _ = load_quantized(str(tmp_path / "pc"), "cpu")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
