"""finalize: provenance (abliteration.json) and a model card for the ablated model.

Writes only ``<out>/abliteration.json`` and ``<out>/README.md``. The weight shards come from the
``ablate@<shard>`` stages and the other files of the folder (config, generation config,
tokenizer, chat template, index, remote code) from the ``carry@<file>`` stages: DVC needs every
output listed statically, so each carried file is its own stage driven by ``model.yaml``.

``abliteration.json`` (sorted keys, no timestamps, so identical inputs give identical bytes):
the tool and its version, the source model's shard sha256 hashes, the directions file's sha256,
the resolved settings and every shard's full plan (edits and their fp64 vectors).
``abliterate verify BASE ABLATED`` reads it back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import typer

from stages.cliutil import console, fail, new_app, run_app

app = new_app(__doc__.split("\n")[0])
PROVENANCE = "abliteration.json"
CARD = "README.md"


def sha256_file(path: Path, progress=None) -> str:
    """sha256 of a file, read in 16 MB blocks; ``progress(n)`` after each block."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(16 * 1024 * 1024):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


def read_plan_dir(plan_dir: Path) -> tuple[dict, dict[str, dict]]:
    """``(settings, {shard key: shard plan})`` of a plan folder; fail if it is incomplete."""
    from stages.ablate import load_plan
    from stages.plan import SETTINGS_FILE

    settings_path = Path(plan_dir) / SETTINGS_FILE
    if not settings_path.is_file():
        fail(f"{settings_path} does not exist; run `dvc repro plan` first")
    settings = json.loads(settings_path.read_text(encoding="utf-8"))
    plans = {key: load_plan(Path(plan_dir) / f"{key}.json") for key in settings["shards"]}
    for key, doc in plans.items():
        if doc["file"] != settings["shards"][key]:
            fail(f"{plan_dir}/{key}.json is for {doc['file']}, not {settings['shards'][key]}; rerun `dvc repro plan`")
    return settings, plans


def layer_ranges(layers: list[int]) -> str:
    """``[3, 4, 5, 8]`` -> ``"3-5, 8"``."""
    parts, values = [], sorted(set(layers))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(parts) or "none"


def model_card(config: dict, settings: dict, plans: dict[str, dict], total_tensors: int) -> str:
    """A short model card: what was done, with which settings, and where the provenance is."""
    from stages import __version__

    name = config.get("_name_or_path") or ",".join(config.get("architectures") or []) or settings["model_type"]
    edits = [e for doc in plans.values() for e in doc["edits"]]
    edited = len({e["tensor"] for e in edits})
    layers = sorted({e["layer"] for e in edits if e["layer"] is not None})
    d = settings["defaults"]
    measurements = sorted({e["measurement"] for e in edits}) or [d["measurement"]]
    scales = sorted({e["scale"] for e in edits}) or [d["scale"]]
    rows = [
        ("decoder layers edited", f"{layer_ranges(layers)} ({len(layers)} of {settings['num_layers']})"),
        ("embeddings edited", "yes" if any(e["role"] == "embeddings" for e in edits) else "no"),
        ("targets", ", ".join(d["targets"])),
        ("measurement (residual index)", ", ".join(map(str, measurements))),
        ("scale", ", ".join(f"{s:g}" for s in scales)),
        ("norm-preserving", "yes" if d["norm_preserve"] else "no"),
        ("biprojection", "yes" if d["projected"] else "no"),
        ("sparsity", f"{d['sparsity']:g}"),
        ("tensors edited", f"{edited} of {total_tensors}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: transformers
tags:
- abliterated
- refusal-direction
---

# {name}, abliterated

A copy of `{name}` ({settings['architecture']}, {settings['num_layers']} layers, hidden size
{settings['hidden_size']}) whose weights were edited so that the chosen layers can no longer write
the refusal direction into the residual stream: every edited writer's columns were projected
off the direction measured by difference of means between harmful and harmless prompts.
Untouched tensors are byte-identical to the source; config and tokenizer are unchanged.

| setting | value |
|---|---|
{table}

`abliteration.json` records the source shards' sha256 hashes, the directions' hash, the full
per-tensor plan (with its direction vectors) and the tool version (abliterate {__version__}).
`abliterate verify SOURCE THIS_FOLDER` re-checks the edit against the source model.

Removing refusals removes a safety behaviour: this model will follow requests the original
declined. You are responsible for how it is used.
"""


def finalize(base: Path, plan_dir: Path, directions: Path, out: Path) -> dict:
    """Write ``out/abliteration.json`` and ``out/README.md``; returns the provenance document."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from stages import __version__
    from stages.ablate import same_file
    from stages.atomic import dumps_json, write_text
    from stages.modelio import check_model_dir, read_config, weight_map

    check_model_dir(base)
    if Path(out).exists() and same_file(base, out):
        fail(f"the output folder {out} is the base model folder; write the ablated model elsewhere")
    if not Path(directions).is_file():
        fail(f"directions file {directions} does not exist; run `dvc repro reduce` first")
    settings, plans = read_plan_dir(plan_dir)
    names = weight_map(base)
    files = sorted(set(names.values()))
    if files != sorted(settings["shards"].values()):
        fail(f"the plan in {plan_dir} is for shards {sorted(settings['shards'].values())} but {base} holds {files}; "
             "rerun `abliterate use` and `dvc repro plan`")
    paths = [Path(base) / f for f in files] + [Path(directions)]
    with Progress(TextColumn("finalize: hashing"), BarColumn(), DownloadColumn(), console=console()) as bar:
        task = bar.add_task("hash", total=sum(p.stat().st_size for p in paths))
        hashes = {p.name: sha256_file(p, lambda n: bar.advance(task, n)) for p in paths}
    config = read_config(base)
    doc = {
        "tool": {"name": "abliterate", "version": __version__},
        "source": {
            "model_type": settings["model_type"], "architectures": config.get("architectures") or [],
            "name_or_path": config.get("_name_or_path", ""), "shards": {f: hashes[f] for f in files},
        },
        "directions": {"file": Path(directions).name, "sha256": hashes[Path(directions).name]},
        "settings": settings,
        "plan": plans,
    }
    card = model_card(config, settings, plans, len(names))
    text = dumps_json(doc)
    write_text(Path(out) / PROVENANCE, text)
    write_text(Path(out) / CARD, card)
    edited = sum(len({e["tensor"] for e in p["edits"]}) for p in plans.values())
    console().print(f"finalize: {out}/{PROVENANCE} and {out}/{CARD} written ({edited} tensors edited)")
    return doc


@app.command()
def main(
    base: Annotated[Path, typer.Option(help="Base model folder (models/base).")],
    plan: Annotated[Path, typer.Option(help="Plan folder written by plan (artifacts/plan).")],
    directions: Annotated[Path, typer.Option(help="directions.safetensors (hashed into the provenance).")],
    out: Annotated[Path, typer.Option(help="The ablated model folder (artifacts/model).")],
) -> None:
    """Write abliteration.json (provenance) and README.md (model card) into the ablated model folder."""
    finalize(base, plan, directions, out)


if __name__ == "__main__":
    run_app(app)
