"""What several `rescue` commands share: loading a model by precision, the W&B logger of Lightning, and
the checks that a config's task and 2-bit twin match what was made before."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from inference.config import RescueConfig
from inference.errors import ConfigError, RescueError


PRECISIONS = ("fp16", "2bit")


def refuse_shipped_destination(destination: str, command: str, field: str, flag: str) -> None:
    """A ConfigError when a command would write into a model folder shipped with the package
    (training/embedded/...): a retrain or a new GPTQ draw goes elsewhere, the shipped one stays."""
    from inference.config import REPO_ROOT
    from inference.decoding.models import local_path

    path = local_path(destination).resolve()
    shipped = (REPO_ROOT / "training" / "embedded").resolve()
    if path == shipped or shipped in path.parents:
        raise ConfigError(f"{command}: {field} {destination} is a model shipped with the package; "
                          f"pass {flag} DIR to write a new one elsewhere")


def task_mismatch(config: RescueConfig) -> str | None:
    """A warning when an embedded family model learned another generated task than the benchmark names.

    The task is in the model folder's `pretrain.json` (`recipe.task`; records from before the
    harder tasks have none and learned `arith`). Real models, and benchmarks that are not
    generated, are never warned about.
    """
    from training.benchmarks import GENERATED_BENCHMARKS

    benchmark = config.benchmark.name.strip().lower()
    if benchmark not in GENERATED_BENCHMARKS:
        return None
    try:
        from inference.decoding.models import resolve_model_source

        record = json.loads((resolve_model_source(config.model.fp16, "model") / "pretrain.json").read_text())
    except (RescueError, OSError, ValueError):
        return None
    learned = record.get("recipe", {}).get("task", "arith")
    if learned == benchmark:
        return None
    return (f"warning: {config.model.fp16} was trained on '{learned}' (its pretrain.json), "
            f"but the benchmark is '{benchmark}'; pass --benchmark {learned} to evaluate it on its own task")


def warn_mismatches(config: RescueConfig, two_bit: bool) -> None:
    """Print (stderr) the warnings about a model run on another task, or a 2-bit folder of another model."""
    for warning in (task_mismatch(config), twin_mismatch(config) if two_bit else None):
        if warning:
            print(warning, file=sys.stderr)


def _lightning_logger(config: RescueConfig, run_dir: Path, job: str):
    """W&B through Lightning's WandbLogger (offline by default); False when W&B is disabled."""
    if config.wandb.mode == "disabled":
        return False
    from lightning.pytorch.loggers import WandbLogger

    from inference.tracking import start_run

    run = start_run(config.wandb.mode, config.wandb.project, f"{config.model.name}-{job}", job,
                    config.to_dict(), run_dir)
    return WandbLogger(experiment=run)


def _load_for_precision(config: RescueConfig, precision: str):
    from inference.decoding.models import load_full_precision, load_quantized

    if precision == "fp16":
        return load_full_precision(config.model.fp16, config.model.dtype, config.model.device,
                                   config.model.fp16_grouped)
    return load_quantized(config.quantized_path, config.model.device, config.model.kernel, config.model.dtype,
                          bits=config.quantization.bits)


# Loops shown in a label report, the first ones in file order.
EXCERPTS = 3


def _quantize_record(config: RescueConfig) -> dict | None:
    """The `rescue_quantize.json` of the config's 2-bit folder, or None where there is none to read."""
    try:
        return json.loads((Path(config.quantized_path) / "rescue_quantize.json").read_text())
    except (OSError, ValueError):
        return None


def _same_model(recorded, configured: str) -> bool | None:
    """Whether two model references name the same folder; None where either cannot be resolved."""
    from inference.decoding.models import resolve_model_source

    try:
        return (resolve_model_source(str(recorded), "model").resolve()
                == resolve_model_source(configured, "model").resolve())
    except RescueError:
        return None


def _quantized_matches(config: RescueConfig) -> bool:
    """Whether the config's 2-bit folder was made by `rescue quantize` from this model with these settings."""
    from dataclasses import asdict

    made = _quantize_record(config)
    if made is None or not _same_model(made.get("fp16"), config.model.fp16):
        return False
    # Records written before keep_fp16 and wider existed quantized every linear to one width.
    recorded = {"keep_fp16": [], "wider": [], "wider_bits": 4, **(made.get("quantization") or {})}
    return recorded == asdict(config.quantization)


def twin_mismatch(config: RescueConfig) -> str | None:
    """A warning when the 2-bit folder was quantized from another model than `model.fp16`.

    Silent where that cannot be told: a folder not made by `rescue quantize`, or a recorded source
    that is not at hand (a twin made on another machine).
    """
    made = _quantize_record(config)
    if made is None or _same_model(made.get("fp16"), config.model.fp16) is not False:
        return None
    return (f"warning: {config.quantized_path} was quantized from {made.get('fp16')} (its rescue_quantize.json), "
            f"not from model.fp16 {config.model.fp16}; its 2-bit results are not that model's")
