"""`rescue pretrain`: train an embedded family model (tiny-s/m/l)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from inference.config import RescueConfig
from inference.errors import ConfigError
from rescue.commands.common import _lightning_logger, refuse_shipped_destination


def newest_checkpoint(folder: Path) -> Path:
    """The epoch checkpoint with the highest epoch in `folder` (as `rescue pretrain` names them)."""
    import re

    found = []
    for path in folder.glob("*.ckpt"):
        match = re.match(r"epoch=(\d+)-step=(\d+)", path.name)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), path.stat().st_mtime, path))
    if not found:
        raise ConfigError(f"pretrain --resume: no epoch checkpoint (epoch=N-step=M.ckpt) in {folder}")
    return max(found)[-1]


def check_weights_fit(saved: dict, model, flag: str, source) -> None:
    """Refuse saved weights that do not have `model`'s names and shapes, naming the first that differs."""
    for name, tensor in model.state_dict().items():
        found = tuple(saved[name].shape) if name in saved else None
        if found != tuple(tensor.shape):
            raise ConfigError(f"pretrain {flag}: {source} does not fit the config's model: {name} is "
                              f"{'missing' if found is None else found} there, the config makes it "
                              f"{tuple(tensor.shape)}")


def check_checkpoint_fits(checkpoint: Path, module) -> None:
    """Refuse a checkpoint whose weights do not have the configured model's names and shapes."""
    import torch

    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    except Exception as error:
        raise ConfigError(f"pretrain --resume: cannot read {checkpoint}: {error}") from None
    check_weights_fit(saved, module, "--resume", checkpoint)


def init_weights_from(folder: str, saved: dict, module) -> None:
    """Load a saved family model's weights into `module.model`, refusing one of another architecture."""
    check_weights_fit(saved, module.model, "--init", folder)
    module.model.load_state_dict(saved, strict=False)  # tied head: lm_head.weight is embed_tokens.weight


def pretrain(config: RescueConfig, out: str | None = None, resume: bool = False, init: str | None = None) -> dict:
    """Train an embedded family model (architecture and recipe in the config's `pretrain` section).

    With `resume`, training continues from the newest epoch checkpoint of an earlier run with the
    same config (weights, optimizer, learning-rate schedule and epoch count come from it). With
    `init`, training starts from the weights of a saved model folder of the same architecture, with
    a fresh optimizer and schedule: continued training, on the traces of `pretrain.seed` (set another
    seed than the first run's for fresh ones)."""

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from inference.storage import folder_written_atomically
    from training.pretrain import ArithTraceData, ReasonerLM, count_parameters, family_config
    from training.tokenizer import build_tokenizer

    spec = config.pretrain
    if resume and init:
        raise ConfigError("pretrain: --resume and --init exclude each other (resume continues a run; init starts one "
                          "from saved weights)")
    out_dir = Path(out or config.model.fp16)
    refuse_shipped_destination(str(out_dir), "pretrain", "--out" if out else "model.fp16", "--out")
    run_dir = Path(config.output_dir) / config.model.name / "pretrain"
    checkpoint = newest_checkpoint(run_dir / "checkpoints") if resume else None
    if init:  # read before the traces are made, so a bad folder fails at once
        from transformers.utils import logging as hf_logging

        from inference.decoding.models import load_full_precision

        hf_logging.disable_progress_bar()  # a bad folder's error stays the one line printed
        try:
            initial = load_full_precision(init, "float32", "cpu")[0].state_dict()
        finally:
            hf_logging.enable_progress_bar()
    tokenizer = build_tokenizer()
    L.seed_everything(spec.seed, verbose=False)
    data = ArithTraceData(tokenizer, spec)
    try:
        data.setup()
    except ValueError as error:  # a trace style no problem can be written in (e.g. max_trace_chars too small)
        raise ConfigError(f"pretrain: {error}") from None
    steps = (len(data.train_set) // spec.batch_size) * spec.epochs
    module = ReasonerLM(family_config(spec, tokenizer), spec, steps)
    if checkpoint:
        check_checkpoint_fits(checkpoint, module)
    if init:
        init_weights_from(init, initial, module)
    parameters = count_parameters(module.model)
    print(f"pretraining {config.model.name}: {parameters / 1e6:.2f}M parameters, {len(data.train_set)} traces, "
          f"{spec.epochs} epochs, {steps} steps")
    logger = _lightning_logger(config, run_dir, "pretrain")
    gpu = torch.cuda.is_available()
    trainer = L.Trainer(
        max_epochs=spec.epochs,
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
        gradient_clip_val=1.0,
        logger=logger,
        log_every_n_steps=20,
        callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_epochs=1, save_top_k=-1),
                   TQDMProgressBar(refresh_rate=20)],
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    began = time.perf_counter()
    if checkpoint:
        print(f"resuming from {checkpoint}")
    trainer.fit(module, data, ckpt_path=checkpoint)
    seconds = time.perf_counter() - began
    if "val/loss" not in trainer.callback_metrics:  # resumed from the last epoch's checkpoint: nothing ran
        trainer.validate(module, data, verbose=False)
    model = module.model.to(torch.float16).cpu()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    record = {
        "model": config.model.name,
        "parameters": parameters,
        "train_traces": len(data.train_set),
        "epochs": spec.epochs,
        "steps": steps,
        "seed": spec.seed,
        "trace_style": dataclasses.asdict(spec.trace_style()),
        "recipe": dataclasses.asdict(spec),
        "resumed_from": str(checkpoint) if checkpoint else None,
        "initialized_from": str(init) if init else None,
        "train_seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "val_loss": float(trainer.callback_metrics.get("val/loss", float("nan"))),
    }
    with folder_written_atomically(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out_dir}: val loss {record['val_loss']:.4f}, {seconds:.0f} s on {record['device']}")
    return record
