"""The one kind of error a user can cause and fix.

Library code raises :class:`UserError` (through :func:`fail`) with a message that says what went
wrong, where, and what to do; the commands turn it into one line on stderr and exit code 2.
"""

from __future__ import annotations

from typing import NoReturn


class UserError(Exception):
    """An error the user can fix: the message says what, where, and what to do."""


def fail(message: str) -> NoReturn:
    raise UserError(message)
