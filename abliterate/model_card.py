"""The model card (``README.md``) of an ablated model folder: what was done, and with which settings."""

from __future__ import annotations

from abliterate import __version__
from abliterate.records import Edit


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


def model_card(config: dict, settings: dict, edits: list[Edit], total_tensors: int) -> str:
    """A short model card: what was done, with which settings, and where the provenance is."""
    name = config.get("_name_or_path") or ",".join(config.get("architectures") or []) or settings["model_type"]
    edited = len({e.tensor for e in edits})
    layers = sorted({e.layer for e in edits if e.layer is not None})
    d = settings["defaults"]
    measurements = sorted({e.measurement for e in edits}) or [d["measurement"]]
    scales = sorted({e.scale for e in edits}) or [d["scale"]]
    rows = [
        ("decoder layers edited", f"{layer_ranges(layers)} ({len(layers)} of {settings['num_layers']})"),
        ("embeddings edited", "yes" if any(e.role == "embeddings" for e in edits) else "no"),
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
