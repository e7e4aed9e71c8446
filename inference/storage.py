"""Files that are either complete or absent: atomic replacement and checksums for every artifact."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def replace_atomically(temporary: Path, path: Path) -> None:
    """Flush `temporary` to disk, then rename it over `path` (readers see the old or the new file)."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and an atomic rename."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    replace_atomically(temporary, path)


@contextlib.contextmanager
def folder_written_atomically(folder: Path) -> Iterator[Path]:
    """Yield a staging folder beside `folder`; on success it replaces `folder`, on failure it is removed.

    A run that fails or is killed therefore never leaves a folder that looks like a finished artifact.
    """
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
