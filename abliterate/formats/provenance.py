"""``abliteration.json``: the provenance of an ablated model folder, written by finalize, read by verify.

Sorted keys, no timestamps, so identical inputs give identical bytes: ``format`` (:data:`FORMAT`),
``tool`` (name, version),
``source`` (the base model's type, architectures, name and every shard's sha256), ``directions``
(file name and sha256), ``settings`` (the plan's ``_settings.json``) and ``plan`` (every shard's
plan document, with its fp64 vectors).
"""

from __future__ import annotations

from pathlib import Path

from abliterate import __version__
from abliterate.errors import fail
from abliterate.formats.jsonfile import read_json, write_json

PROVENANCE = "abliteration.json"
CARD = "README.md"
FORMAT = 1


def provenance(config: dict, settings: dict, plan_docs: dict[str, dict], shard_hashes: dict[str, str],
               directions: str, directions_sha256: str) -> dict:
    """The provenance document (``plan_docs``: shard key -> the plan document as stored)."""
    return {
        "format": FORMAT,
        "tool": {"name": "abliterate", "version": __version__},
        "source": {
            "model_type": settings["model_type"], "architectures": config.get("architectures") or [],
            "name_or_path": config.get("_name_or_path", ""), "shards": dict(shard_hashes),
        },
        "directions": {"file": directions, "sha256": directions_sha256},
        "settings": settings,
        "plan": plan_docs,
    }


def write_provenance(folder: str | Path, doc: dict) -> None:
    write_json(Path(folder) / PROVENANCE, doc)


def read_provenance(folder: str | Path) -> dict:
    """The provenance of an ablated folder; one line if it is missing or unreadable."""
    doc = read_json(Path(folder) / PROVENANCE, "provenance", "rerun `dvc repro finalize`",
                    missing="verify needs the provenance written by `dvc repro finalize`")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not {"source", "settings", "plan"} <= set(doc):
        fail(f"{Path(folder) / PROVENANCE} is not a provenance file of format {FORMAT} written by finalize; "
             "rerun `dvc repro finalize`")
    return doc
