"""JSON artifacts: byte-stable writing, and reading with one clear line when a file is unusable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from abliterate.errors import fail
from abliterate.formats.atomic import write_text


def dumps_json(obj: Any) -> str:
    """Byte-stable JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(target: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` atomically as byte-stable JSON."""
    write_text(target, dumps_json(obj))


def read_json(path: str | os.PathLike | None, what: str, fix: str, missing: str | None = None) -> Any:
    """The JSON document at ``path``, or one line naming ``what`` and the ``fix``.

    ``missing``: the advice when the file does not exist (default: ``fix``).
    """
    if path is None or not Path(path).is_file():
        fail(f"{what} {path} does not exist; {missing or fix}")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"{what} {path} is not valid JSON ({exc}); {fix}")
    except OSError as exc:
        fail(f"cannot read {what} {path} ({exc.strerror or exc}); {fix}")
