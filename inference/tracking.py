"""Weights & Biases as the experiment tracker: offline unless asked, never a prompt, never a hang.

One `rescue run` is one W&B group (`experiment`), its stages runs of that group with the stage as
job type (collect, label, train, compare, report). Trace sets, their labels, the detector and the
comparison are artifacts; each stage declares the artifacts it read (`use_artifacts`), so the
lineage reads collect -> label -> train -> compare. Inside a group a stage logs only its own config
sections (`stage_config`) and the group's report run logs the whole config once; a stage run on its
own is its own experiment and logs the whole config.

Metric names are the same for every method and model size: `<method>/<metric>` (`learned/accuracy`,
`fp16/mean_tokens_fp16`), so runs of different sizes line up in the W&B UI.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

_EXPERIMENT: dict[str, str | None] = {"group": None}

STAGE_SECTIONS = {
    "collect": ("model", "benchmark", "sampling", "capture"),
    "label": ("labels",),
    "train": ("detector", "probe", "labels"),
    "compare": ("model", "benchmark", "sampling", "rescue"),
    "evaluate": ("model", "benchmark", "sampling", "rescue"),
    "detect-report": ("detector",),
}
"""The config sections a stage logs inside a `rescue run` group (the report run logs them all)."""


@contextlib.contextmanager
def experiment(group: str):
    """Every run started inside belongs to the W&B group `group` (one `rescue run`)."""
    previous, _EXPERIMENT["group"] = _EXPERIMENT["group"], group
    try:
        yield group
    finally:
        _EXPERIMENT["group"] = previous


def current_group() -> str | None:
    return _EXPERIMENT["group"]


def stage_config(config, job_type: str, **extra: Any) -> dict[str, Any]:
    """What a stage logs as its W&B config: its own sections inside a group, the whole config alone."""
    full = config.to_dict()
    if current_group() is None or job_type not in STAGE_SECTIONS:
        return {**full, **extra}
    return {"model_name": config.model.name, **{k: full[k] for k in STAGE_SECTIONS[job_type]}, **extra}


def online_problem(timeout: float = 5.0) -> str | None:
    """Why `wandb.mode online` cannot work here (no API key, server unreachable), or None."""
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    parsed = urlparse(base_url)
    host = parsed.hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY") and not _netrc_key(host):
        return "online needs a W&B login (`wandb login` or WANDB_API_KEY) and none is configured"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"the W&B server {base_url} cannot be reached ({type(error).__name__})"
    return None


def _netrc_key(host: str) -> str | None:
    import netrc

    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def check_wandb_mode(settings) -> None:
    """Before any work: `online` without a login or a reachable server says so in one line and
    falls back to offline (the run is kept under <output_dir>/<model>/.../wandb to `wandb sync` later)."""
    if settings.mode != "online":
        return
    problem = online_problem()
    if problem:
        print(f"warning: --wandb online: {problem}; logging offline instead (upload later with "
              "`wandb sync <the run's wandb/offline-run-* folder>`)", file=sys.stderr)
        settings.mode = "offline"


def start_run(mode: str, project: str, name: str, job_type: str, config: dict[str, Any], folder: str | Path):
    """A W&B run in `mode` (offline, online or disabled) writing under `folder`, in the current
    experiment's group; None when disabled."""
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    import wandb

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(init_timeout=60, console="off", disable_git=True, silent=True, x_disable_stats=True)
    return wandb.init(
        project=project, name=name, job_type=job_type, group=current_group(), config=config, dir=str(folder),
        mode=mode, settings=settings, reinit="finish_previous",
    )


def folder_artifact(name: str, kind: str, folder: str | Path, files: Iterable[str] | None = None,
                    metadata: dict | None = None):
    """An artifact for a folder. With `files`, those small files only (their checksums make the version;
    large shards are neither copied nor uploaded, the folder's path is in the metadata); without, the
    whole folder (a detector: a few hundred kB)."""
    import wandb

    folder = Path(folder).resolve()
    artifact = wandb.Artifact(_artifact_name(name), type=kind, metadata={"folder": str(folder), **(metadata or {})})
    if files is None:
        artifact.add_dir(str(folder))
        return artifact
    for file in files:
        if (folder / file).is_file():
            artifact.add_file(str(folder / file), name=file)
    return artifact


def trace_set_artifact(folder: str | Path, model_name: str):
    """A trace set (`rescue collect`), versioned by its manifest (shard checksums, identity)."""
    return folder_artifact(f"{model_name}-{Path(folder).name}", "trace-set", folder, ["manifest.json"])


def labels_artifact(folder: str | Path, model_name: str):
    """A labeled trace set (`rescue label`): the manifest and labels.json."""
    return folder_artifact(f"{model_name}-{Path(folder).name}-labels", "labels", folder,
                           ["manifest.json", "labels.json"])


def detector_artifact(folder: str | Path, model_name: str, metadata: dict | None = None):
    """A detector folder (`rescue train`): weights and card."""
    return folder_artifact(f"{model_name}-detector", "detector", folder, None, metadata)


def comparison_artifact(folder: str | Path, model_name: str):
    """A comparison (`rescue compare`): comparison.json/md and the plots (per-method records by reference)."""
    folder = Path(folder)
    files = ["comparison.json", "comparison.md", *sorted(p.name for p in folder.glob("*.png"))]
    return folder_artifact(f"{model_name}-{folder.name}", "comparison", folder, files)


def method_metrics(method: str, summary: dict) -> dict[str, Any]:
    """A method's scalar results under `<method>/<metric>` (counts under `<method>/actions/<kind>` ...)."""
    metrics = {f"{method}/{key}": value for key, value in summary.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    for group in ("finish_reasons", "actions"):
        for key, count in (summary.get(group) or {}).items():
            metrics[f"{method}/{group}/{key}"] = count
    return metrics


def comparison_table(model_name: str, summaries: dict[str, dict]):
    """One `wandb.Table`, a row per method: model, method and every scalar metric (same columns for every
    size, so tables of several runs concatenate in the UI)."""
    import wandb

    metrics = sorted({key for s in summaries.values() for key, value in s.items()
                      if isinstance(value, (int, float)) and not isinstance(value, bool)})
    table = wandb.Table(columns=["model", "method", *metrics])
    for method, summary in summaries.items():
        table.add_data(model_name, method, *(summary.get(key) for key in metrics))
    return table


def _artifact_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def use_artifacts(run, artifacts: Iterable) -> None:
    """Declare `artifacts` (built again from the same files, so with the same digests) as inputs of `run`.

    Online this is `run.use_artifact`. Offline, W&B refuses `use_artifact`; the run then records them
    the way `use_artifact` records a new local artifact (logged with `use_after_commit`), which
    `wandb sync` turns into the same input edge, matched to the producing run's version by digest.
    """
    for artifact in artifacts:
        if run.offline:
            run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
        else:
            run.use_artifact(artifact)
