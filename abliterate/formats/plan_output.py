"""``artifacts/plan/_output.json``: what the ablated folder's config and index become when the plan
writes edited quantized tensors as bfloat16 (``ablate.quantized-edits``, :mod:`abliterate.quant.expand`).

``format`` (:data:`FORMAT`), ``not_converted`` (the modules the config must name as not to quantize),
``removed`` (stored tensors gone: the converted ones' codes and scales), ``added`` (the bfloat16
tensors, name -> shard file) and ``size_change`` (bytes). With nothing converted, ``not_converted`` is
empty and every carried file is copied unchanged. Plain JSON only: the ``carry`` stage reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from abliterate.errors import fail

FORMAT = 1
OUTPUT_FILE = "_output.json"
FIX = "rerun `dvc repro plan`"


def read_changes(plan_dir: Path | None) -> dict | None:
    """The plan's ``_output.json`` (None without a plan folder, or when nothing is converted)."""
    from abliterate.formats.jsonfile import read_json

    if plan_dir is None:
        return None
    doc = read_json(Path(plan_dir) / OUTPUT_FILE, "plan output file", FIX, missing="run `dvc repro plan` first")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("not_converted"), list):
        fail(f"{Path(plan_dir) / OUTPUT_FILE} is not a plan output file of format 1; {FIX}")
    return doc if doc["not_converted"] else None


LIST_KEY = {"fp8": "modules_to_not_convert", "mxfp4": "modules_to_not_convert", "compressed-tensors": "ignore",
            "modelopt": "exclude_modules"}


def carried_bytes(name: str, raw: bytes, changes: dict | None) -> bytes:
    """A carried file as the ablated folder holds it: the base's bytes, except (when tensors are converted)
    the config's list of modules not to convert and the index's weight map."""
    if not changes or name not in ("config.json", "hf_quant_config.json") and not name.endswith(".index.json"):
        return raw
    doc = json.loads(raw.decode("utf-8"))
    if name.endswith(".index.json"):
        weights = {k: v for k, v in doc.get("weight_map", {}).items() if k not in set(changes["removed"])}
        weights.update(changes["added"])
        doc["weight_map"] = dict(sorted(weights.items()))
        if isinstance(doc.get("metadata"), dict) and isinstance(doc["metadata"].get("total_size"), int):
            doc["metadata"]["total_size"] += int(changes["size_change"])
    elif name == "hf_quant_config.json":
        quant = doc.setdefault("quantization", {})
        quant["exclude_modules"] = _extended(quant.get("exclude_modules"), changes["not_converted"])
    else:
        holder = doc if "quantization_config" in doc else doc.get("text_config", {})
        qc = holder.get("quantization_config")
        if isinstance(qc, dict):
            key = LIST_KEY.get(str(qc.get("quant_method", "")).lower(), "modules_to_not_convert")
            qc[key] = _extended(qc.get(key), changes["not_converted"])
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _extended(existing, modules: list[str]) -> list[str]:
    kept = list(existing) if isinstance(existing, list) else []
    return kept + [m for m in modules if m not in kept]
