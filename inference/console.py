"""What the console shows: each stage's own lines and progress bar; library logs go to a log file.

The libraries (GPTQModel, transformers, accelerate, tokenicer, wandb, Lightning, datasets, the
Hugging Face hub) log through Python's `logging`, except GPTQModel's LogBar, which prints
to stdout and draws its own progress bars. `route_library_logs` sends every library record to a
log file and lets only warnings and errors through to the console (everything, with `verbose`);
`library_output` wraps the GPTQModel calls, turning what LogBar and GPTQModel's plain prints write
into records of the `gptqmodel` logger and leaving the progress bar to the stage.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from pathlib import Path

LIBRARIES = ("gptqmodel", "logbar", "transformers", "accelerate", "tokenicer", "wandb", "lightning",
             "lightning.pytorch", "lightning.fabric", "datasets", "huggingface_hub", "py.warnings")
"""Logger names whose records below WARNING go to the log file only. torch is left as it is: its own
handlers print warnings only (at WARNING by default), and at INFO it adds reports at exit."""

_ROUTE = {"verbose": True, "log_file": None}
_LEVEL_PREFIX = re.compile(r"^(DEBUG|INFO|WARN|WARNING|ERROR|CRITICAL)\b\s*(.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


HARMLESS_WARNINGS = (
    ("accelerate.utils.modeling", "The model weights are not tied"),
)
"""(logger, message start) of library warnings that say nothing about the run: file only unless verbose.
accelerate's comes from GPTQModel planning the device map of a tied-embedding model before its empty
weights are tied (every 2-bit load of the family and of Qwen3's small sizes); the weights are tied when
they load."""


class _ConsoleFilter(logging.Filter):
    """Python warnings (deprecations, Lightning's data-loader hints) are about the code, not the run, and
    so are `HARMLESS_WARNINGS`: file only unless verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _ROUTE["verbose"]:
            return True
        if record.name == "py.warnings":
            return False
        message = record.getMessage()
        return not any(record.name == name and message.startswith(start) for name, start in HARMLESS_WARNINGS)


class _Stderr(logging.StreamHandler):
    """The console handler: writes to whatever `sys.stderr` is at the time (pytest swaps it per test)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LogFile(logging.FileHandler):
    """The log file, made (with its folder) at the first record: a command that logs nothing leaves none."""

    def __init__(self, path: str | Path):
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def log_file_for(output_dir: str | Path, model_name: str, command: str) -> Path:
    """`<output_dir>/<model>/logs/<command>-<UTC time>.log` (one per invocation; per rank under torchrun)."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    rank = os.environ.get("RANK")
    suffix = f"-rank{rank}" if rank not in (None, "0") else ""
    return Path(output_dir) / model_name / "logs" / f"{command}-{stamp}{suffix}.log"


def route_library_logs(log_file: str | Path | None, verbose: bool = False) -> None:
    """Every library record goes to `log_file`; the console (stderr) gets warnings and errors only,
    or everything with `verbose`. Safe to call again (the handlers it installed are replaced)."""
    _ROUTE.update(verbose=verbose, log_file=Path(log_file) if log_file else None)
    root = logging.getLogger()
    for handler in list(root.handlers):
        # Ours from an earlier call, and the plain one `logging.basicConfig` makes (tokenicer calls it).
        if getattr(handler, "_rescue", False) or type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
            handler.close()
    console = _Stderr()
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    console.addFilter(_ConsoleFilter())
    handlers: list[logging.Handler] = [console]
    if log_file:
        to_file = _LogFile(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
    for handler in handlers:
        handler._rescue = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    for name in LIBRARIES:
        _through_root(logging.getLogger(name))
    _quiet_huggingface(verbose)
    if not verbose:
        os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")  # advice for free-threaded MoE quantization
        os.environ.setdefault("WANDB_SILENT", "true")


def _through_root(logger: logging.Logger) -> None:
    """Drop a library's own console handler, so its records reach the root logger's handlers."""
    for handler in list(logger.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
    logger.propagate = True  # its level stays the library's own


def _quiet_huggingface(verbose: bool) -> None:
    """transformers and the hub keep their own default handlers and download/loading bars."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity_info()
    if verbose:
        hf_logging.enable_progress_bar()
        enable_progress_bars()
    else:
        hf_logging.disable_progress_bar()
        disable_progress_bars()
    _through_root(logging.getLogger("transformers"))


class _LinesToLogger(io.TextIOBase):
    """A stdout stand-in: each complete line becomes a record of `logger`, at the level LogBar prefixed
    it with (`INFO`, `WARN`, `ERROR` ...), INFO for plain prints."""

    _logbar_queue_wrapped = True  # LogBar then writes here directly instead of through its flush thread

    def __init__(self, logger: logging.Logger):
        import threading

        self._logger, self._pending, self._lock = logger, "", threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        pass

    def close_pending(self) -> None:
        if self._pending:
            self._emit(self._pending)
            self._pending = ""

    def _emit(self, line: str) -> None:
        line = _ANSI.sub("", line.rsplit("\r", 1)[-1]).rstrip()
        if not line.strip():
            return
        match = _LEVEL_PREFIX.match(line)
        level, message = (logging.INFO, line) if match is None else (
            logging.WARNING if match.group(1) == "WARN" else getattr(logging, match.group(1)), match.group(2))
        self._logger.log(level, message)


@contextlib.contextmanager
def library_output():
    """Inside: GPTQModel's log lines and prints go to the `gptqmodel` logger (the log file; warnings
    also to the console) and its live progress bars are off. Does nothing with `verbose` or when
    `route_library_logs` was not called (library code used from Python keeps its own output)."""
    if _ROUTE["verbose"]:
        yield
        return
    stream = _LinesToLogger(logging.getLogger("gptqmodel"))
    with contextlib.redirect_stdout(stream):
        restore = _silence_logbar_bars()
        try:
            yield
        finally:
            restore()
            stream.close_pending()


def _silence_logbar_bars():
    """Swap LogBar's progress bars for GPTQModel's own no-op bar (what it uses under pytest)."""
    try:
        from gptqmodel.utils.logger import _SilentProgress
        from logbar import LogBar
    except ImportError:
        return lambda: None
    shared = LogBar.shared()
    shared.pb = lambda iterable, **_: _SilentProgress(iterable)
    shared.spinner = lambda *_, **__: _SilentProgress()

    def restore() -> None:
        for name in ("pb", "spinner"):
            shared.__dict__.pop(name, None)

    return restore
