"""sha256 of files and texts, as recorded in metadata and provenance."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

BLOCK = 16 * 1024 * 1024


def sha256_file(path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, read in 16 MB blocks; ``progress(n)`` after each block."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
