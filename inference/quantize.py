"""Making the 2-bit twin: GPTQ through GPTQModel, saved as a local folder.

The folder is written under a temporary name and renamed into place when complete, so an
interrupted run never leaves a folder that looks like a finished model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Sequence

from inference.config import QuantizationConfig
from inference.errors import RescueError
from inference.models import pick_device, resolve_model_source
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
    from gptqmodel import GPTQModel, QuantizeConfig

    target = pick_device(device)
    quantize_config = QuantizeConfig(
        bits=settings.bits,
        group_size=settings.group_size,
        desc_act=settings.desc_act,
        damp_percent=settings.damp_percent,
        offload_to_disk=False,
    )
    started = time.perf_counter()
    with folder_written_atomically(out_dir) as staging:
        # GPTQModel writes its per-layer logs to ./logs; keep them inside the model folder instead.
        with contextlib.chdir(staging):
            model = GPTQModel.load(str(source.resolve()), quantize_config, device=str(target))
            model.quantize(list(calibration_texts), batch_size=batch_size)
            model.save(str(staging))
        summary = {
            "fp16": fp16_ref,
            "out": str(out_dir),
            "bits": settings.bits,
            "group_size": settings.group_size,
            "desc_act": settings.desc_act,
            "calibration_texts": len(calibration_texts),
            "quantization": dataclasses.asdict(settings),
            "device": str(target),
            "seconds": round(time.perf_counter() - started, 2),
        }
        (staging / "rescue_quantize.json").write_text(json.dumps(summary, indent=2))
    return summary
