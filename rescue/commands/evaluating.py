"""`rescue evaluate`: one method on a benchmark, graded."""

from __future__ import annotations

from pathlib import Path

from inference.config import RescueConfig
from inference.errors import RescueError
from rescue.commands.comparing import compare


def evaluate(
    config: RescueConfig,
    method: str = "2bit",
    limit: int | None = None,
    out: str | None = None,
) -> dict:
    """Run one method on the configured benchmark split and write its evaluation record."""
    from inference.evaluation.compare import METHODS as ALL_METHODS

    if method not in ALL_METHODS:
        raise RescueError(f"--method must be one of {', '.join(ALL_METHODS)}, got {method!r}")
    bench = config.benchmark
    out_dir = Path(out or Path(config.output_dir) / config.model.name / f"evaluate-{method}-{bench.name}-{bench.split}")
    return compare(config, limit=limit, methods=(method,), out=str(out_dir), single=True)
