"""File digests, shared by the checkpoint manifest and the data cache key."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 22


def sha256_stream(f: BinaryIO) -> str:
    """The sha256 of what is left to read in `f` (a local file or an fsspec file), read in 4 MiB chunks."""
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)
