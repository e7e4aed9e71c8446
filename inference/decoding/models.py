"""Loading the model pair: the full-precision model and its 2-bit GPTQ twin.

Both are given as a Hugging Face id or a local folder. Ids are resolved through the local Hugging
Face cache first; without network a missing model is reported in one line instead of a stack trace
from deep inside a library.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from inference.config import REPO_ROOT
from inference.decoding.attention import use_grouped_attention
from inference.errors import ModelUnavailableError

REQUIRED_MODEL_FILES = ("config.json",)
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def pick_device(device: str = "auto") -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU and float32 on the CPU (half precision matmuls are slow there)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def local_path(ref: str) -> Path:
    """`ref` as a local path; a relative one that exists only under the project root is taken from
    there (configs name shipped models relative to it)."""
    path = Path(ref).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


def resolve_model_source(ref: str, role: str = "model") -> Path:
    """A local folder holding the model `ref` (a folder path or a Hugging Face id).

    A path-like `ref` must be a complete local folder. An id is taken from the Hugging Face cache,
    or downloaded when the hub is reachable and offline mode is off.
    """
    path = local_path(ref)
    looks_local = path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise ModelUnavailableError(f"{role} folder {ref} does not exist")
        _check_model_folder(path, role)
        return path.resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline:
        try:
            return Path(snapshot_download(ref, etag_timeout=10))
        except Exception:
            pass
    raise ModelUnavailableError(
        f"{role} {ref} is not available offline (no such local folder, not in the Hugging Face cache); "
        f"pass a local folder (for example --model.fp16 /path/to/model), download it once with network "
        f"access, or for a 2-bit model make it with `rescue quantize`"
    )


def _check_model_folder(path: Path, role: str) -> None:
    for name in REQUIRED_MODEL_FILES:
        if not (path / name).is_file():
            raise ModelUnavailableError(f"{role} folder {path} is missing {name}")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ModelUnavailableError(f"{role} folder {path} has no weights (*.safetensors or *.bin)")
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError:
        raise ModelUnavailableError(f"{role} folder {path}: config.json is not valid JSON") from None


def load_tokenizer(source: Path):
    """The tokenizer saved beside a model (the 2-bit twin carries a copy of its base model's)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise ModelUnavailableError(f"model folder {source} has no usable tokenizer ({type(error).__name__})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizer_matches(model, tokenizer, source: Path) -> None:
    """Every token id the tokenizer can produce must have an embedding row in the model."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ModelUnavailableError(
            f"{source}: tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}"
        )


def load_full_precision(ref: str, dtype: str = "auto", device: str = "auto", grouped: bool = False):
    """The full-precision model (eval mode) and its tokenizer; with `grouped`, each layer's q/k/v and gate/up
    projections run as one matmul each (`kernels.group_linear_projections`)."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(ref, "model")
    target = pick_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=pick_dtype(dtype, target))
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(f"model folder {source} cannot be loaded: {str(error).splitlines()[0]}") from None
    model = model.to(target).eval()
    if target.type == "cuda":
        use_grouped_attention(model)
    if grouped:
        from inference.decoding.kernels import group_linear_projections

        group_linear_projections(model)
    tokenizer = load_tokenizer(source)
    check_tokenizer_matches(model, tokenizer, source)
    return model, tokenizer


GPTQ_FORMATS = ("gptq", "gptq_v2")
"""Checkpoint formats `load_quantized` reads: "gptq" (v1 zero points, stored minus one: published
checkpoints and what GPTQModel saves) and "gptq_v2" (stored as used); GPTQModel converts v1 on load."""


def quantization_settings(source: Path, bits: int | None = None) -> dict:
    """The GPTQ settings of a quantized model folder (`quantize_config.json`, else config.json's
    `quantization_config`), checked: GPTQ, a known checkpoint format, integer bits (== `bits` if given).
    """
    path = source / "quantize_config.json"
    if path.is_file():
        try:
            settings = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ModelUnavailableError(f"{path}: not valid JSON") from None
    else:
        path = source / "config.json"
        settings = json.loads(path.read_text()).get("quantization_config")
        if settings is None:
            raise ModelUnavailableError(
                f"2-bit model folder {source} has no GPTQ quantization config (no quantize_config.json, no "
                "quantization_config in config.json); make it with `rescue quantize`")
        path = Path(f"{path} quantization_config")
    if not isinstance(settings, dict):
        raise ModelUnavailableError(f"{path}: expected a mapping of GPTQ settings, got {type(settings).__name__}")
    method = str(settings.get("quant_method", settings.get("method", "gptq"))).lower()
    if method != "gptq":
        raise ModelUnavailableError(f"{path}: field 'quant_method' must be gptq (a GPTQ checkpoint), got {method!r}")
    checkpoint_format = str(settings.get("checkpoint_format", settings.get("format", "gptq"))).lower()
    if checkpoint_format not in GPTQ_FORMATS:
        raise ModelUnavailableError(f"{path}: field 'checkpoint_format' must be one of {', '.join(GPTQ_FORMATS)}, "
                                    f"got {checkpoint_format!r}")
    found = settings.get("bits")
    if not isinstance(found, int) or isinstance(found, bool) or found not in (2, 3, 4, 8):
        raise ModelUnavailableError(f"{path}: field 'bits' must be 2, 3, 4 or 8, got {found!r}")
    if bits is not None and found != bits:
        raise ModelUnavailableError(f"{path}: field 'bits' is {found}, but a {bits}-bit GPTQ checkpoint was expected "
                                    "(quantization.bits)")
    return settings


def load_quantized(ref: str, device: str = "auto", kernel: str = "dequantized", dtype: str = "auto",
                   bits: int | None = None):
    """The 2-bit GPTQ model and its tokenizer.

    `ref` is a folder made by `rescue quantize` or a published GPTQ checkpoint (GPTQModel/AutoGPTQ
    layout, v1 or v2 zero points); its settings are checked first (`quantization_settings`; `bits`, when
    given, is the width it must have). `kernel="gptq"` keeps GPTQModel's packed 2-bit linears (the real
    memory saving; speed depends on the backend). `kernel="dequantized"` unpacks each quantized weight
    once into a plain linear in `dtype`: the same 2-bit weight values, hence the same traces, but
    ordinary matmuls, which is much faster for small models and on the CPU. `kernel="fused"` keeps the
    packed weights and runs decoding steps through `inference.decoding.kernels.gptq2_matmul` (2-bit, CUDA only;
    prefill multiplies by each weight dequantized whole, `kernels.PREFILL`). `kernel="fused-grouped"` is
    `fused` with each decoder layer's q, k, v projections one kernel call and gate, up another
    (`kernels.group_2bit_projections`; a copy of their packed buffers, about 0.7x more 2-bit weight memory).
    """
    source = resolve_model_source(ref, "2-bit model")
    settings = quantization_settings(source, bits)
    fused = kernel in ("fused", "fused-grouped")
    if fused and settings["bits"] != 2:
        raise ModelUnavailableError(f"{source}: model.kernel {kernel} runs 2-bit checkpoints only; this one has "
                                    f"{settings['bits']} bits (use dequantized or gptq)")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    from inference.console import library_output

    with library_output():
        from gptqmodel import BACKEND, GPTQModel

    target = pick_device(device)
    if fused and target.type != "cuda":
        raise ModelUnavailableError(f"model.kernel {kernel} runs on a CUDA GPU only, not on {target}; "
                                    "use dequantized or gptq here")
    backend = BACKEND.TORCH if target.type == "cpu" or kernel == "dequantized" or fused else BACKEND.AUTO
    with library_output():
        wrapped = GPTQModel.load(str(source), device=str(target), backend=backend)
    model = wrapped.model.eval()
    if kernel == "dequantized":
        model = dequantize_linears(model).to(device=target, dtype=pick_dtype(dtype, target))
    elif fused:
        from inference.decoding.kernels import fuse_2bit_linears, group_2bit_projections

        try:
            fuse_2bit_linears(model)
            if kernel == "fused-grouped":
                group_2bit_projections(model)
        except ValueError as error:
            raise ModelUnavailableError(f"2-bit model folder {source}: {error}") from None
    if target.type == "cuda":
        use_grouped_attention(model)
    tokenizer = load_tokenizer(source)
    check_tokenizer_matches(model, tokenizer, source)
    return model, tokenizer


@torch.no_grad()
def dequantize_linears(model):
    """Replace every GPTQModel torch-kernel linear by an `nn.Linear` holding its dequantized weight."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    for name, module in list(model.named_modules()):
        if not isinstance(module, TorchLinear):
            continue
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight.copy_(module.dequantize_weight().T.float())
        if module.bias is not None:
            linear.bias.copy_(module.bias.float())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    model.config.quantization_config = None
    return model
