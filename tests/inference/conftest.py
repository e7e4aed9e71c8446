"""Fixtures of the inference tests: the project's Triton modules run in Triton's CPU interpreter."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest


@contextlib.contextmanager
def _interpreted_copy(name: str, kernel: str):
    """A private copy of module `name` whose Triton kernels run in Triton's CPU interpreter.

    @triton.jit reads TRITON_INTERPRET when it wraps a kernel, not when triton is imported, so
    executing the module with the variable set works even after other tests imported triton; a
    separate module object leaves the module as other tests see it untouched. The variable stays set
    while the tests run because the interpreter consults it at launch too. `kernel` names one of the
    module's kernels, checked to be interpreted.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        spec = importlib.util.find_spec(name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert type(getattr(module, kernel)).__name__ == "InterpretedFunction"
        yield module


@pytest.fixture(scope="session")
def interpreted_copy():
    """The context manager `_interpreted_copy(name, kernel)`, for module-scoped fixtures of the test files."""
    return _interpreted_copy
