"""One function per `rescue` subcommand. Each takes the validated config plus its own options.

These functions are the only place that wires stages together (benchmarks from `training`,
models and runners from `inference`); the stage packages never import each other upward.

Each command's wiring is its own module; this package names them all, so that `from rescue import
commands` reaches every one.
"""

from __future__ import annotations

from rescue.commands.common import (  # noqa: F401
    _lightning_logger, _load_for_precision, _quantize_record, _quantized_matches, _same_model, EXCERPTS,
    PRECISIONS, task_mismatch, twin_mismatch, warn_mismatches,
)
from rescue.commands.quantizing import quantize  # noqa: F401
from rescue.commands.evaluating import evaluate  # noqa: F401
from rescue.commands.comparing import (  # noqa: F401
    _check_methods, compare, default_methods, format_summary, log_comparison, RUN_LEAVES_OUT, run_methods,
)
from rescue.commands.pretraining import (  # noqa: F401
    check_checkpoint_fits, check_weights_fit, init_weights_from, newest_checkpoint, pretrain,
)
from rescue.commands.collecting import _track_trace_set, collect  # noqa: F401
from rescue.commands.labeling import _flatten, label  # noqa: F401
from rescue.commands.fitting import train  # noqa: F401
from rescue.commands.reporting import _labeled_ids, detect_report  # noqa: F401
from rescue.commands.running import (  # noqa: F401
    _detector_matches, _report_markdown, _run_stages, _track_report, rescue_goals, run,
)
