"""``verify`` for quantized targets: edited tensors compared de-quantized, against the re-quantization floor.

For each piece (the tensor, or one MXFP4 expert) of an edited quantized tensor: the base and the
ablated piece are de-quantized; the exact float32 edit of the base is re-quantized *plainly* (the
same scale search with the old scales as hints, nearest rounding, no direction-aware rounding):
that is the floor, the component along ``r`` that re-quantization alone leaves. The ablated
tensor passes when its component is at most twice the floor's and its column (row) norms drift
from the base's no more than twice the floor's drift (norm preservation acts before quantization,
so quantization alone moves the norms a little). Components are measured as in
:func:`abliterate.verification.edited_metrics`: ``max |r . (g * w)| / |g * w|`` over the writes.
"""

from __future__ import annotations

import os
from pathlib import Path

from abliterate.records import Edit

SLACK = 1e-6  # float32 arithmetic on both sides


def covered(edits: dict[str, list[Edit]]) -> dict[str, tuple[str, bool]]:
    """On-disk name -> ``(edited tensor, is it the one to measure it by)`` for every quantized edit's storage."""
    from abliterate.quant.registry import stored_names

    found = {}
    for name, group in edits.items():
        if group[0].storage is not None:
            names = stored_names(group[0].storage)
            found.update({n: (name, i == 0) for i, n in enumerate(names)})
    return found


def _measure(new, old, edit: Edit, gain) -> tuple[float, float]:
    """``(max relative component along r, max relative norm drift)`` of one piece (plan layout, float64)."""
    import numpy as np

    r = np.asarray(edit.direction, dtype=np.float64)
    g = np.ones_like(r) if gain is None else np.asarray(gain, dtype=np.float64)
    s = float(edit.scale)
    u = np.asarray(edit.vector, dtype=np.float64)
    new, old = new.astype(np.float64), old.astype(np.float64)
    if edit.layout == "rows":  # residual last: make it the first axis, as for columns
        new, old = new.T, old.T
    writes = g[:, None] * new
    norms = np.linalg.norm(writes, axis=0)
    live = norms > 0
    comp = float((np.abs((g * r) @ new)[live] / norms[live]).max()) if live.any() else 0.0
    nb, na = np.linalg.norm(old, axis=0), np.linalg.norm(new, axis=0)
    kept = (nb > 0) & (1 - (2 * s - s * s) * (u @ old) ** 2 / np.maximum(nb**2, 1e-300) > 1e-6)
    drift = float((np.abs(na - nb)[kept] / nb[kept]).max()) if kept.any() else 0.0
    return comp, drift


def quantized_metrics(base: Path, ablated: Path, group: list[Edit], gain) -> dict:
    """``comp``, ``drift`` of the ablated tensor and ``floor``, ``floor_drift`` of plain re-quantization."""
    from abliterate.formats.safetensors_io import read_header
    from abliterate.quant import stored
    from abliterate.quant.rewrite import apply_edits

    record, last = group[0].storage, group[-1]
    tb, ta = read_header(base).tensors, read_header(ablated).tensors
    out = {"comp": 0.0, "drift": 0.0, "floor": 0.0, "floor_drift": 0.0}
    fd_b, fd_a = os.open(base, os.O_RDONLY), os.open(ablated, os.O_RDONLY)
    try:
        for piece in stored.pieces(record, tb):
            old, state = stored.load(fd_b, record, tb, piece)
            new, _ = stored.load(fd_a, record, ta, piece)
            exact = apply_edits(old.copy(), group)
            plain = stored.dequantize(record, stored.quantize(record, exact, state, None, last.layout))
            comp, drift = _measure(new, old, last, gain)
            floor, floor_drift = _measure(plain, old, last, gain)
            for key, value in (("comp", comp), ("drift", drift), ("floor", floor), ("floor_drift", floor_drift)):
                out[key] = max(out[key], value)
    finally:
        os.close(fd_b)
        os.close(fd_a)
    out["tol"] = 2 * out["floor"] + SLACK
    out["norm_tol"] = 2 * out["floor_drift"] + SLACK
    return out


def converted_metrics(base: Path, ablated: Path, name: str, record: dict, shape: tuple[int, ...],
                      group: list[Edit] | None, gain) -> tuple[object, float, float]:
    """A tensor written as bfloat16 (``ablate.quantized-edits``): ``(Recomputed, comp, drift)``, its bytes
    against ablate's own (de-quantized, edited when ``group`` is given, rounded to bfloat16) and, when
    edited, its component along ``r`` and norm drift from the de-quantized base (as above)."""
    import numpy as np

    from abliterate.formats.safetensors_io import decode, encode, read_header, read_into
    from abliterate.quant import stored
    from abliterate.quant.expand import bf16_pieces
    from abliterate.verify_tensors import Recomputed, compare

    tb = read_header(base).tensors
    info = read_header(ablated).tensors.get(name)
    result, comp, drift = Recomputed(), 0.0, 0.0
    if info is None or info.dtype != "BF16" or tuple(info.shape) != tuple(shape):
        return Recomputed(elements=0, identical=False, outside=1, worst=float("inf")), 0.0, 0.0
    fd_b, fd_a = os.open(base, os.O_RDONLY), os.open(ablated, os.O_RDONLY)
    try:
        at = info.begin
        for piece, values in enumerate(bf16_pieces(fd_b, record, tb, group)):
            expected = np.asarray(encode(values, "BF16"))
            got = np.empty_like(expected)
            read_into(fd_a, memoryview(got).cast("B"), at, name)
            at += expected.nbytes
            compare(result, expected, got, "BF16", 2.0**-8)
            if group:
                old = stored.load(fd_b, record, tb, piece)[0]
                c, d = _measure(decode(got, "BF16").reshape(values.shape), old, group[-1], gain)
                comp, drift = max(comp, c), max(drift, d)
    finally:
        os.close(fd_b)
        os.close(fd_a)
    return result, comp, drift
