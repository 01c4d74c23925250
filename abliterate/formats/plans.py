"""``artifacts/plan/``: the edits ``plan`` decided, one JSON document per shard, read by ablate and finalize.

``<shard key>.json`` exists for every shard of ``model.yaml``: ``format`` (:data:`FORMAT`),
``file`` (the shard's file name), ``hidden_size``, ``edits`` (the entries of
:meth:`abliterate.edits.Edit.to_json`, sorted by tensor, each tensor's edits in application order)
and ``vectors``: the fp64 values of the directions and vectors they name (``v0000``, ... in order
of first use, each distinct vector once). An untouched shard has an empty edit list, so a shard
whose edits did not change keeps identical bytes and DVC skips its ablate stage.

``_settings.json`` beside them holds the resolved settings of the whole plan (per-layer settings,
defaults, shard table, edited tensors per shard), read by ``finalize``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from abliterate.records import Edit
from abliterate.errors import fail
from abliterate.formats.atomic import atomic_path
from abliterate.formats.jsonfile import dumps_json, read_json

FORMAT = 1
SETTINGS_FILE = "_settings.json"
FIX = "rerun `dvc repro plan`"


@dataclass(frozen=True)
class ShardPlan:
    """One shard's plan, checked: its edits with their vectors resolved, and the document as stored."""

    file: str | None
    hidden_size: int
    edits: list[Edit]
    doc: dict

    def by_tensor(self) -> dict[str, list[Edit]]:
        """The edits grouped by tensor, each group in application order."""
        grouped: dict[str, list[Edit]] = {}
        for edit in self.edits:
            grouped.setdefault(edit.tensor, []).append(edit)
        return grouped


def shard_documents(edits: list[Edit], shards: dict[str, str], hidden: int) -> dict[str, dict]:
    """One JSON-ready document per shard key of ``shards`` (key -> file name)."""
    key_of = {f: k for k, f in shards.items()}
    docs = {k: {"format": FORMAT, "file": f, "hidden_size": hidden, "edits": [], "vectors": {}}
            for k, f in sorted(shards.items())}
    ids: dict[str, dict[tuple, str]] = defaultdict(dict)
    for edit in sorted(edits, key=lambda e: e.tensor):
        key = key_of[edit.file]
        table, named = ids[key], []
        for values in (edit.direction, edit.vector):
            values = tuple(float(x) for x in values)
            if values not in table:
                table[values] = f"v{len(table):04d}"
                docs[key]["vectors"][table[values]] = list(values)
            named.append(table[values])
        docs[key]["edits"].append(edit.to_json(*named))
    return docs


def write_plan_dir(out: str | Path, documents: dict[str, dict], settings: dict, extra: dict[str, dict] | None = None
                   ) -> None:
    """Write every shard's document, the settings and the ``extra`` documents (file name -> document: the
    output changes of :mod:`abliterate.quant.expand`) into the folder ``out``, replaced atomically."""
    if SETTINGS_FILE[:-5] in documents:
        fail(f"model.yaml uses the reserved shard key {SETTINGS_FILE[:-5]!r}; run `abliterate use SOURCE` again")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for key, doc in documents.items():
            (tmp / f"{key}.json").write_text(dumps_json(doc), encoding="utf-8")
        (tmp / SETTINGS_FILE).write_text(dumps_json(settings), encoding="utf-8")
        for name, doc in (extra or {}).items():
            (tmp / name).write_text(dumps_json(doc), encoding="utf-8")


def parse_shard_plan(doc, where: str) -> ShardPlan:
    """Check a shard's document (format, finite vectors of the right size, every named vector
    present) and resolve its edits; one line naming ``where`` if anything is off."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "edits" not in doc or "vectors" not in doc:
        fail(f"{where} is not a shard plan of format {FORMAT}; {FIX}")
    try:
        hidden = int(doc["hidden_size"])
    except (KeyError, TypeError, ValueError):
        fail(f"{where} has no hidden_size; {FIX}")
    vectors: dict[str, Sequence[float]] = doc["vectors"]
    for key, values in vectors.items():
        if not (isinstance(values, list) and len(values) == hidden
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            fail(f"plan vector {key} is not {hidden} finite values; {FIX}")
    edits = []
    for entry in doc["edits"]:
        name = entry.get("tensor") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("direction") not in vectors or entry.get("vector") not in vectors:
            fail(f"an edit of tensor {name} names a vector the plan does not hold; {FIX}")
        try:
            edits.append(Edit.from_json(entry, vectors, doc.get("file")))
        except (KeyError, TypeError) as exc:
            fail(f"an edit of tensor {name} in {where} lacks {exc}; {FIX}")
    return ShardPlan(doc.get("file"), hidden, edits, doc)


def load_shard_plan(path: str | Path) -> ShardPlan:
    """Read and check one shard's plan file."""
    doc = read_json(path, "plan file", FIX, missing="run `dvc repro plan` first")
    return parse_shard_plan(doc, str(path))


def read_plan_dir(plan_dir: str | Path) -> tuple[dict, dict[str, ShardPlan]]:
    """``(settings, {shard key: shard plan})`` of a plan folder; one line if it is incomplete."""
    settings = read_json(Path(plan_dir) / SETTINGS_FILE, "plan settings", FIX, missing="run `dvc repro plan` first")
    plans = {key: load_shard_plan(Path(plan_dir) / f"{key}.json") for key in settings["shards"]}
    for key, plan in plans.items():
        if plan.file != settings["shards"][key]:
            fail(f"{plan_dir}/{key}.json is for {plan.file}, not {settings['shards'][key]}; {FIX}")
    return settings, plans
