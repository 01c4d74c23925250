"""How library code tells what it is doing: messages and progress, to whoever called it.

Long-running library functions take ``report: Reporter``. The plain :class:`Reporter` writes
lines to stderr: each message, and for a task a line at most every :data:`INTERVAL` seconds
plus one when it ends (a log, a CI run or a queued experiment gets a readable record). The
commands pass a reporter that draws live bars when stderr is a terminal (``stages/cliutil.py``);
the library itself never draws anything.

A task's ``fields`` are short texts shown after the count (``best: 3/32 refusals``, ``loss 0.41``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

INTERVAL = 30.0  # seconds between two plain progress lines of one task


def amount(value: float, unit: str) -> str:
    """``1.2 GB`` for bytes, the plain count otherwise."""
    if unit != "bytes":
        return f"{value:g}"
    for size, name in ((1 << 30, "GB"), (1 << 20, "MB"), (1 << 10, "kB")):
        if value >= size:
            return f"{value / size:.1f} {name}"
    return f"{value:g} B"


class Task:
    """One unit of progress: ``advance(n)`` as work is done, ``update(**fields)`` to change the texts."""

    def __init__(self, description: str, total: float | None, unit: str, fields: dict[str, str], write):
        self.description, self.total, self.unit = description, total, unit
        self.fields, self.done = dict(fields), 0.0
        self.started = self.last = time.monotonic()
        self._write = write

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= INTERVAL:
            self.last = now
            self._write(self.line(now))

    def update(self, **fields: str) -> None:
        self.fields.update(fields)

    def line(self, now: float | None = None, final: bool = False) -> str:
        elapsed = (now or time.monotonic()) - self.started
        count = amount(self.done, self.unit) + (f"/{amount(self.total, self.unit)}" if self.total else "")
        text = " ".join(str(v) for v in self.fields.values() if v)
        eta = ""
        if not final and self.total and self.done:
            eta = f", about {elapsed * (self.total - self.done) / self.done:.0f} s left"
        return f"{self.description}: {count}{' ' + text if text else ''} ({elapsed:.0f} s{eta})"


class Reporter:
    """Plain lines on stderr; subclasses draw the same things differently."""

    def message(self, text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None, unit: str = "", **fields: str) -> Iterator[Task]:
        """A task of ``total`` steps (``unit="bytes"`` shows sizes); a line when it ends without error."""
        task = Task(description, total, unit, fields, self.message)
        yield task
        self.message(task.line(final=True))


PLAIN = Reporter()


class Silent(Reporter):
    """Says nothing (tests, nested calls)."""

    def message(self, text: str) -> None:
        pass
