"""A published 2-bit GPTQ checkpoint by path: v1 zero points, checked settings, GPTQModel's load, the fused kernel."""

import importlib.util
import json
import shutil

import pytest
import torch

from inference.decoding.models import load_quantized, quantization_settings
from inference.errors import ModelUnavailableError
from training.rehearsal import round_to_nearest, write_gptq_v1_checkpoint

pytest.importorskip("gptqmodel")


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model's 2-bit twin as published checkpoints are laid out (round to nearest, group 32)."""
    out = tmp_path_factory.mktemp("published") / "tiny-2bit-gptq"
    write_gptq_v1_checkpoint(tiny_model_dir, out, group_size=32)
    return out


def test_published_layout_stores_v1_zero_points(published_dir):
    from safetensors.torch import load_file

    settings = json.loads((published_dir / "quantize_config.json").read_text())
    assert settings["checkpoint_format"] == "gptq" and settings["bits"] == 2 and settings["sym"]
    qzeros = load_file(published_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.qzeros"]
    assert bool(((qzeros.long() & 3) == 1).all())  # zero point 2, stored as 2 - 1


def test_published_checkpoint_loads_with_its_zero_points_restored(published_dir, tiny_model_dir):
    """GPTQModel's v1 -> v2 conversion on load: the dequantized weights are (q - 2) * s of the rounding."""
    from inference.decoding.models import load_full_precision

    plain, _ = load_quantized(str(published_dir), "cpu", kernel="dequantized", dtype="float32")
    full, _ = load_full_precision(str(tiny_model_dir), dtype="float32", device="cpu")
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        original = full.get_submodule(f"model.layers.1.{name}").weight
        codes, zeros, scales = round_to_nearest(original.detach(), 32)
        steps = scales.float().repeat_interleave(32, 0)
        expected = (codes.float() - zeros.float().repeat_interleave(32, 0)) * steps
        loaded = plain.get_submodule(f"model.layers.1.{name}").weight.detach()
        # GPTQModel dequantizes in bf16 on the CPU: within bf16 rounding of (q - 2) * s, while zero
        # points read as stored (v2, q - 1) would be a whole step s away.
        torch.testing.assert_close(loaded, expected.T, rtol=8e-3, atol=1e-6)
        assert (loaded - (expected + steps).T).abs().min() > 0.5 * float(scales.float().min())


def test_published_checkpoint_runs_through_the_fused_kernel_like_gptqmodel(published_dir, monkeypatch):
    """Decoding-sized calls through `gptq2_matmul` (Triton's CPU interpreter) give GPTQModel's own logits."""
    pytest.importorskip("triton")
    with monkeypatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        spec = importlib.util.find_spec("inference.decoding.kernels")
        kernels = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kernels)
        packed, tokenizer = load_quantized(str(published_dir), "cpu", kernel="gptq")
        # float32: the interpreter's tl.dot (2..16 rows) mishandles bf16, which only a GPU runs.
        packed = packed.float()
        ids = torch.tensor([tokenizer("<think>\n2 + 3 = 5").input_ids[:6]])
        with torch.no_grad():
            reference = packed(input_ids=ids).logits.float()
            swapped = kernels.fuse_2bit_linears(packed.model)
            assert swapped == 14  # 7 linears x 2 layers
            fused = packed(input_ids=ids).logits.float()  # 6 rows: every linear through the kernel
    torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))


@pytest.mark.parametrize("edit, message", [
    ({"bits": 4}, "field 'bits' is 4, but a 2-bit GPTQ checkpoint was expected"),
    ({"quant_method": "awq"}, "field 'quant_method' must be gptq"),
    ({"checkpoint_format": "marlin"}, "field 'checkpoint_format' must be one of gptq, gptq_v2"),
    ({"bits": "two"}, "field 'bits' must be 2, 3, 4 or 8"),
])
def test_a_checkpoint_that_is_not_2bit_gptq_is_refused_in_one_line(published_dir, tmp_path, edit, message):
    folder = tmp_path / "bad"
    shutil.copytree(published_dir, folder)
    path = folder / "quantize_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ModelUnavailableError, match=message) as error:
        load_quantized(str(folder), "cpu", kernel="gptq", bits=2)
    assert "quantize_config.json" in str(error.value) and "\n" not in str(error.value)


def test_settings_are_read_from_config_json_when_quantize_config_is_absent(published_dir, tmp_path):
    folder = tmp_path / "config-only"
    shutil.copytree(published_dir, folder)
    (folder / "quantize_config.json").unlink()
    assert quantization_settings(folder, bits=2)["group_size"] == 32
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelUnavailableError, match="config.json quantization_config: field 'bits' is 3"):
        quantization_settings(folder, bits=2)
    with pytest.raises(ModelUnavailableError, match="fused runs 2-bit checkpoints only"):
        load_quantized(str(folder), "cpu", kernel="fused")
    with pytest.raises(ModelUnavailableError, match="fused-grouped runs 2-bit checkpoints only"):
        load_quantized(str(folder), "cpu", kernel="fused-grouped")
