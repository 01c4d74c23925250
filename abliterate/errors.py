"""The one kind of error a user can cause and fix.

Library code raises :class:`UserError` (through :func:`fail`) with a message that says what went
wrong, where, and what to do; the commands turn it into one line on stderr and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn


class UserError(Exception):
    """An error the user can fix: the message says what, where, and what to do."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def existing(path: str | Path, kind: str, what: str, missing: str, wrong: str) -> Path:
    """``path`` if it exists and is a ``kind`` (``"file"`` or ``"folder"``); else one line:
    ``{what} {path} does not exist; {missing}`` or ``{path} is not a {kind}; {wrong}``."""
    path = Path(path)
    if not path.exists():
        fail(f"{what} {path} does not exist; {missing}")
    if not (path.is_dir() if kind == "folder" else path.is_file()):
        fail(f"{path} is not a {kind}; {wrong}")
    return path
