"""Errors meant for users: each carries one line that names the file or field and what was expected.

The CLI prints `str(error)` alone (no traceback) and exits non-zero for any `RescueError`.
"""


class RescueError(Exception):
    """Base of every error the `rescue` commands report to the user as one line."""


class ConfigError(RescueError):
    """A config file or a command-line override is missing, malformed or out of range."""


class ModelUnavailableError(RescueError):
    """A model id or folder cannot be loaded (missing offline, incomplete folder, mismatched tokenizer)."""
