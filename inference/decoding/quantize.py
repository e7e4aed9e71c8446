"""Making the 2-bit twin: GPTQ through GPTQModel, saved as a local folder.

The folder is written under a temporary name and renamed into place when complete, so an
interrupted run never leaves a folder that looks like a finished model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Sequence

from inference.config import QuantizationConfig
from inference.console import library_output
from inference.decoding.models import pick_device, resolve_model_source
from inference.errors import RescueError
from inference.storage import folder_written_atomically


def quantize_model(
    fp16_ref: str,
    out_dir: str | Path,
    calibration_texts: Sequence[str],
    settings: QuantizationConfig,
    device: str = "auto",
    batch_size: int = 4,
) -> dict:
    """Quantize `fp16_ref` with GPTQ on `calibration_texts` and save it to `out_dir`; returns a summary."""
    if not calibration_texts:
        raise RescueError("quantization needs at least one calibration text; the calibration set is empty")
    source = resolve_model_source(fp16_ref, "model")
    out_dir = Path(out_dir).resolve()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    with library_output():
        from gptqmodel import GPTQModel, QuantizeConfig

    target = pick_device(device)
    quantize_config = QuantizeConfig(
        bits=settings.bits,
        group_size=settings.group_size,
        desc_act=settings.desc_act,
        damp_percent=settings.damp_percent,
        # GPTQModel's default group-aware act-order needs groups; per-channel (-1) has one per row.
        # (Left to its default otherwise: set explicitly, it refuses desc_act.)
        act_group_aware=None if settings.group_size > 0 else False,
        dynamic=module_rules(settings.keep_fp16, settings.wider, settings.wider_bits),
        offload_to_disk=False,
    )
    started = time.perf_counter()
    with folder_written_atomically(out_dir) as staging:
        # GPTQModel writes its per-layer logs to ./logs; keep them inside the model folder instead.
        with contextlib.chdir(staging), library_output():
            model = GPTQModel.load(str(source.resolve()), quantize_config, device=str(target))
            kept = kept_linears(model.model, settings.keep_fp16, fp16_ref)
            wider = wider_linears(model.model, settings, kept, fp16_ref)
            with LayerProgress(model.model.config.num_hidden_layers) as model.layer_callback:
                model.quantize(list(calibration_texts), batch_size=batch_size)
            model.save(str(staging))
        summary = {
            "fp16": fp16_ref,
            "out": str(out_dir),
            "bits": settings.bits,
            "group_size": settings.group_size,
            "desc_act": settings.desc_act,
            "calibration_texts": len(calibration_texts),
            "kept_fp16": kept,
            "wider": wider,
            "quantization": dataclasses.asdict(settings),
            "device": str(target),
            "seconds": round(time.perf_counter() - started, 2),
        }
        (staging / "rescue_quantize.json").write_text(json.dumps(summary, indent=2))
    return summary


class LayerProgress:
    """The quantize stage's progress bar: one tick per decoder layer, from GPTQModel's layer callback
    (`layer_complete`, called once with `submodule_finalized=False` when a layer is quantized)."""

    def __init__(self, layers: int):
        self.layers = layers

    def __enter__(self) -> "LayerProgress":
        from tqdm import tqdm

        self.bar = tqdm(total=self.layers, desc="quantize", unit="layer", dynamic_ncols=True)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def layer_complete(self, layer_idx: int, submodule_finalized: bool) -> None:
        if not submodule_finalized and self.bar.n < self.layers:
            self.bar.update(1)


def module_rules(keep_fp16: Sequence[str], wider: Sequence[str] = (), wider_bits: int = 4) -> dict[str, dict] | None:
    """GPTQModel's `dynamic` overrides: the linears named by `keep_fp16` left unquantized, those named
    by `wider` quantized to `wider_bits`.

    A `-:` key excludes every module whose full name the regex *matches from the start*, both when
    quantizing and when the saved model is loaded (the rule travels in quantize_config.json); a `+:` key
    overrides that module's settings. The first matching key wins, so the exclusions come first. Our
    patterns match anywhere in the name, hence the `.*` in front.
    """
    rules: dict[str, dict] = {f"-:.*(?:{pattern})": {} for pattern in keep_fp16}
    rules.update({f"+:.*(?:{pattern})": {"bits": wider_bits} for pattern in wider})
    return rules or None


def kept_linears(model, keep_fp16: Sequence[str], fp16_ref: str) -> list[str]:
    """Names of the linears (the output head aside) that `keep_fp16` keeps in full precision.

    A pattern that names no linear (most likely a misspelt module name), or patterns that leave
    nothing to quantize, are refused.
    """
    linears = _quantizable_linears(model)
    kept = _named_by(linears, keep_fp16, "quantization.keep_fp16", fp16_ref)
    if linears and len(kept) == len(linears):
        raise RescueError(f"quantization.keep_fp16 {list(keep_fp16)} keeps every linear of {fp16_ref} "
                          "in full precision; nothing is left to quantize")
    return kept


def wider_linears(model, settings: QuantizationConfig, kept: Sequence[str], fp16_ref: str) -> list[str]:
    """Names of the linears that `settings.wider` quantizes to `settings.wider_bits` (those kept in full
    precision aside); a pattern that names no linear is refused."""
    named = _named_by(_quantizable_linears(model), settings.wider, "quantization.wider", fp16_ref)
    return [name for name in named if name not in kept]


def _quantizable_linears(model) -> list[str]:
    """Names of the model's linears, the output head aside (GPTQ leaves it in full precision)."""
    import torch

    output = model.get_output_embeddings()
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not output]


def _named_by(linears: Sequence[str], patterns: Sequence[str], field: str, fp16_ref: str) -> list[str]:
    """The `linears` that any of `patterns` matches anywhere in the name; a pattern matching none is refused."""
    for pattern in patterns:
        if not any(re.search(pattern, name) for name in linears):
            raise RescueError(f"{field}: {pattern!r} matches no linear of {fp16_ref} "
                              f"(names look like {linears[0] if linears else 'none'})")
    return [name for name in linears if any(re.search(pattern, name) for pattern in patterns)]
