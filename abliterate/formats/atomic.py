"""Atomic outputs: write to a temporary name beside the target, rename on success.

An interrupted stage therefore never leaves a half-written file under the final name, and a
failed stage leaves nothing at all. A write that fails for a reason the user can fix (a full disk,
a read-only or foreign folder) is one line (:func:`cannot_write`), the temporary file removed.
:func:`remove_stale` removes what a killed run left (``.<name>.XXXXXXXX.tmp`` beside the target);
:func:`same_file` tells an output that is its own input.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from abliterate.errors import UserError

# errno of a failed write -> what to do about it
WRITE_FIXES = {
    errno.ENOSPC: "free some space on that disk (or write elsewhere)",
    errno.EDQUOT: "free some of your disk quota (or write elsewhere)",
    errno.EFBIG: "the file system cannot hold a file this large: write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "make the folder writable (or write elsewhere)",
    errno.EPERM: "make the folder writable (or write elsewhere)",
}


def cannot_write(target: str | os.PathLike, exc: OSError) -> UserError:
    """The one-line error of a failed write of ``target`` (an errno of :data:`WRITE_FIXES`)."""
    where = f" ({exc.filename})" if exc.filename and Path(str(exc.filename)).name != Path(target).name else ""
    return UserError(f"cannot write {target}: {exc.strerror or exc}{where}; {WRITE_FIXES[exc.errno]}")


@contextlib.contextmanager
def writing(target: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write for ``target`` (a full disk, a read-only folder) into its one-line error."""
    try:
        yield
    except OSError as exc:
        if exc.errno in WRITE_FIXES:
            raise cannot_write(target, exc) from None
        raise


def remove_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed runs writing ``target`` left beside it; returns them."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[A-Za-z0-9_]{{8}}(\..*)?\.tmp")
    removed = []
    if target.parent.is_dir():
        for path in sorted(target.parent.iterdir()):
            if pattern.fullmatch(path.name):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` if the block succeeds.

    Works for files and for directories (whatever the block creates at the yielded path).
    An existing ``target`` is replaced only after the new one is complete.
    """
    target = Path(target)
    # The name is chosen before anything exists, so that the ``finally`` below removes whatever gets
    # created, wherever an exception (Ctrl-C, SIGTERM made to raise) lands; the block creates it.
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}{suffix}.tmp"
    try:
        with writing(target):  # a full disk, a read-only folder: one line, nothing left behind
            target.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            if not tmp.exists():
                raise FileNotFoundError(f"nothing was written to {tmp}")
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(tmp, target)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True if ``a`` and ``b`` are the same path (after resolving links) or the same file."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
