"""llm-abliteration's ``.refuse`` layout of the measured directions (written by ``export-refuse``).

The ``.refuse`` file is a ``torch.save`` dict: ``layers`` (int L) and, for ``l = 0 .. L-1``,
``harmful_{l}`` / ``harmless_{l}`` (the means), ``refuse_{l}`` (the raw harmful - harmless
difference) and ``refusenorm_{l}`` (the unit direction, orthogonalized if reduce ran with
``orthogonalize``). Its index ``l`` is the hidden state entering decoder layer ``l``, the same
convention as ours, so the numbers are copied one to one; our index ``L`` (the last layer's
output), which that layout has no key for, is left out. The means and directions are the fp64
results of ``reduce`` stored as fp32 (``--dtype bfloat16`` matches that tool's own files).
"""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import fail

DTYPES = ("float32", "bfloat16", "float16")


def refuse_dict(tensors: dict, metadata: dict[str, str], dtype: str = "float32") -> dict:
    """The ``.refuse`` dict from a directions dict (as ``reduce`` writes it)."""
    import torch

    if dtype not in DTYPES:
        fail(f"export-refuse dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    num_layers = int(metadata["num_layers"])
    out: dict = {"layers": num_layers}
    for i in range(num_layers):
        for ours, theirs in (("harmful_mean", "harmful"), ("harmless_mean", "harmless"),
                             ("direction", "refuse"), ("unit", "refusenorm")):
            key = f"{ours}.{i}"
            if key not in tensors:
                fail(f"the directions lack {key}; rerun the reduce stage")
            out[f"{theirs}_{i}"] = tensors[key].to(getattr(torch, dtype)).clone()
    return out


def export_refuse(directions: Path, out: Path, dtype: str = "float32") -> int:
    """Write ``out`` from a directions file; return the number of layers exported."""
    import torch

    from abliterate.formats.atomic import atomic_path
    from abliterate.formats.directions import load_directions

    tensors, metadata = load_directions(directions)
    data = refuse_dict(tensors, metadata, dtype)
    with atomic_path(out) as tmp:
        torch.save(data, tmp)
    return data["layers"]
