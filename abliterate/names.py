"""Names that reach a shell command or a path: the keys ``abliterate use`` generates, and the file
names a model folder brings.

``dvc.yaml`` pastes ``${key}`` (never a file name) into the commands of ``ablate@KEY`` and
``carry@KEY``, so a key must match :data:`SHARD_KEY` or :data:`FILE_KEY`: checked when model.yaml
is written and again when it is read. A file name is looked up by its key inside the stage and
only has to be a plain name inside the folder that DVC reads literally.
"""

from __future__ import annotations

import re
from pathlib import Path

from abliterate.errors import fail

SHARD_KEY = re.compile(r"[0-9]{5}")
FILE_KEY = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


def check_file_name(name: object, where: str | Path) -> None:
    """One line unless ``name`` is a plain file name: no path, no control character, and no ``${``
    (which dvc.yaml would read as a variable in the deps and outs that list the file)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "${" in name
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        fail(f"{where}: the file name {name!r} cannot be carried through the pipeline (a path, a control "
             "character or '${'); rename the file")


def check_key(key: object, table: str, where: str | Path) -> None:
    """One line unless ``key`` matches its table's pattern (``shards``: 00001, ``files``: tokenizer-config)."""
    pattern, example = (SHARD_KEY, "00001") if table == "shards" else (FILE_KEY, "tokenizer-config")
    if not isinstance(key, str) or not pattern.fullmatch(key):
        fail(f"{where}: {table} key {key!r} is not of the form {example!r} (keys name stages in shell "
             "commands); run `abliterate use SOURCE` again")
