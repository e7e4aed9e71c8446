"""Weights & Biases runs: offline unless the user asks for online, never a prompt, never a hang."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def start_run(mode: str, project: str, name: str, job_type: str, config: dict[str, Any], folder: str | Path):
    """A W&B run in `mode` (offline, online or disabled) writing under `folder`; None when disabled."""
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    import wandb

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(init_timeout=60, console="off", disable_git=True, silent=True, x_disable_stats=True)
    return wandb.init(
        project=project, name=name, job_type=job_type, config=config, dir=str(folder),
        mode=mode, settings=settings, reinit="finish_previous",
    )
