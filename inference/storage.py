"""Files that are either complete or absent: atomic replacement and checksums for every artifact."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
