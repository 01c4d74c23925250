"""Edit a shard's quantized tensors in their own format (the ablate stage's second pass).

The shard has already been copied byte for byte (:func:`abliterate.shard_edit.ablate_shard`);
for each planned tensor stored quantized this module reads it (one tensor, or one expert of a
fused MXFP4 tensor, at a time), de-quantizes it to float32, applies the very edit a bf16 tensor
gets (:func:`apply_edits`: the chunked column statistics and composition of
:mod:`abliterate.linalg`, so norm preservation acts on the de-quantized columns), quantizes it
back with fresh scales (each codec's least-error search, the old scales as a hint) and writes the
codes and scales over their old bytes: same header, dtypes, shapes and offsets.
"""

from __future__ import annotations

import os
from pathlib import Path

from abliterate.errors import fail
from abliterate.records import Edit

FIX = "rerun `dvc repro plan`"


def logical(record: dict, tensors: dict) -> tuple[str, tuple[int, ...]] | None:
    """``(stored dtype, logical shape)`` of a storage record in a shard's header; ``None`` if a tensor is missing."""
    from abliterate.quant.registry import stored_names

    if any(n not in tensors for n in stored_names(record)):
        return None
    if record["format"] == "mxfp4":
        e, rows, groups, _ = tensors[record["blocks"]].shape
        return "U8", (e, groups * 32, rows)
    weight = tensors[record["weight"]]
    if record["format"] == "nvfp4":
        return "U8", (weight.shape[0], weight.shape[1] * 2)
    return weight.dtype, tuple(weight.shape)


def check_stored(header, name: str, edits: list[Edit]) -> None:
    """The plan's quantized tensor matches the shard (names, dtypes, logical shape); plain Python."""
    record = edits[0].storage
    if record.get("format") not in CODECS or any(e.storage != record for e in edits):
        fail(f"the plan's storage of tensor {name} is unknown or inconsistent; {FIX}")
    if len({e.layout for e in edits}) != 1 or (record["format"] == "mxfp4" and edits[0].layout != "rows"):
        fail(f"the plan mixes layouts for tensor {name}; {FIX}")
    found = logical(record, header.tensors)
    if found is None or found != (edits[0].dtype, tuple(edits[0].shape)):
        got = "missing" if found is None else f"{found[0]} {list(found[1])}"
        fail(f"quantized tensor {name} in {header.path} is {got}, but the plan expects {edits[0].dtype} "
             f"{list(edits[0].shape)}; the plan is out of date: {FIX}")


def apply_edits(values, edits: list[Edit]):
    """The bf16 edit on a de-quantized float32 tensor (``[hidden, in]`` columns, ``[rows, hidden]`` rows), in place."""
    import numpy as np

    from abliterate.formats.safetensors_io import CHUNK_ELEMENTS
    from abliterate.linalg import apply_columns, apply_rows, column_coefficients, column_stats

    if not np.isfinite(values).all():
        fail(f"tensor {edits[0].tensor} de-quantizes to NaN or infinite values; the checkpoint is damaged")
    u = np.stack([np.asarray(e.vector, dtype=np.float64) for e in edits], axis=1)  # [hidden, T]
    uc = u.astype(np.float32)
    step = max(1, CHUNK_ELEMENTS // max(values.shape[1], 1))  # the row chunks of the bf16 path
    chunks = [(a, min(a + step, values.shape[0])) for a in range(0, values.shape[0], step)]
    if edits[0].layout == "columns":
        g, n2 = np.zeros((u.shape[1], values.shape[1])), np.zeros(values.shape[1])
        for a, b in chunks:
            part_g, part_n2 = column_stats(values[a:b], uc[a:b])
            g += part_g
            n2 += part_n2
        coef, f = column_coefficients(g, n2, u, [e.scale for e in edits], [e.norm_preserve for e in edits])
        for a, b in chunks:
            apply_columns(values[a:b], uc[a:b], coef.astype(np.float32), f.astype(np.float32))
        return values
    for a, b in chunks:
        for t, e in enumerate(edits):
            values[a:b] = apply_rows(values[a:b], uc[:, t], float(e.scale), bool(e.norm_preserve))
    return values


def _read(fd: int, info, offset: int = 0, count: int | None = None):
    """``count`` bytes (all by default) of a tensor from ``offset`` as a uint8 numpy array."""
    import numpy as np

    from abliterate.formats.safetensors_io import read_into

    count = info.nbytes - offset if count is None else count
    out = np.empty(count, dtype=np.uint8)
    read_into(fd, memoryview(out), info.begin + offset, info.name)
    return out


def _floats(fd: int, info):
    """A float tensor (F32/BF16/F16 scales) as flat float32."""
    import numpy as np

    from abliterate.formats.safetensors_io import read_rows

    rows, _ = (1, 1) if not info.shape else (info.numel // info.shape[-1], info.shape[-1])
    return read_rows(fd, info, 0, rows).astype(np.float32).reshape(-1)


def _write(fd: int, info, data, offset: int = 0) -> None:
    from abliterate.formats.safetensors_io import write_at

    raw = memoryview(data.tobytes())
    if offset + len(raw) > info.nbytes:
        raise ValueError(f"write outside tensor {info.name}")
    write_at(fd, raw, info.begin + offset)


def _as_dtype(values, dtype: str):
    """float32 values -> the storage array of a float ``dtype`` (bf16 rounded to nearest even)."""
    from abliterate.formats.safetensors_io import encode

    return encode(values.reshape(-1).astype("float32"), dtype)


def _steered(values, codes, scales, edits: list[Edit], grid: str, transpose: bool) -> None:
    """:func:`abliterate.quant.steer.steer` on a stored matrix ``[hidden, in]`` (``transpose``: it is
    ``[rows, hidden]``), against the last edit's vector; ``grid``: ``e4m3`` or ``e2m1``."""
    import numpy as np

    from abliterate.quant.numerics import E2M1_VALUES, e4m3_table
    from abliterate.quant.steer import steer

    magnitudes = e4m3_table()[:0x7F] if grid == "e4m3" else np.array(E2M1_VALUES, dtype=np.float32)
    u = np.asarray(edits[-1].vector, dtype=np.float64)
    if transpose:
        values, codes, scales = values.T, codes.T, scales.T
    steer(values, codes, scales, u, magnitudes, 0x80 if grid == "e4m3" else 0x8)


def _fp8(fd_in: int, fd_out: int, tensors: dict, record: dict, edits: list[Edit]) -> None:
    import numpy as np

    from abliterate.formats.safetensors_io import decode
    from abliterate.quant import fp8

    winfo, sinfo = tensors[record["weight"]], tensors[record["scale"]]
    rows, cols = winfo.shape
    block = tuple(record["block"]) if "block" in record else None
    grid, blk = fp8.grid_of(rows, cols, tuple(sinfo.shape), block)
    codes = _read(fd_in, winfo).reshape(rows, cols)
    scales = _floats(fd_in, sinfo)
    values = apply_edits(fp8.dequantize(codes, scales, grid, blk), edits)

    def round_scale(candidate):  # what the scale's dtype will hold
        stored = _as_dtype(candidate, sinfo.dtype)
        return decode(stored, sinfo.dtype).astype(np.float32).reshape(candidate.shape)

    new_codes, new_scales = fp8.quantize(values, grid, blk, hint=scales, round_scale=round_scale)
    (r, c), (bm, bn) = grid, blk
    per_element = np.repeat(np.repeat(new_scales.reshape(r, c), bm, 0)[:rows], bn, 1)[:, :cols]
    _steered(values, new_codes, per_element, edits, "e4m3", edits[0].layout == "rows")
    _write(fd_out, winfo, new_codes)
    _write(fd_out, sinfo, _as_dtype(new_scales, sinfo.dtype))


def _mxfp4(fd_in: int, fd_out: int, tensors: dict, record: dict, edits: list[Edit]) -> None:
    import numpy as np

    from abliterate.quant import mxfp4
    from abliterate.quant.numerics import pack_nibbles, unpack_nibbles

    binfo, sinfo = tensors[record["blocks"]], tensors[record["scales"]]
    experts, rows, groups, _ = binfo.shape
    per_b, per_s = rows * groups * 16, rows * groups
    for e in range(experts):  # one expert at a time: [rows = hidden, in] quantized, [in, hidden] for the edit
        blocks = _read(fd_in, binfo, e * per_b, per_b).reshape(rows, groups, 16)
        scales = _read(fd_in, sinfo, e * per_s, per_s).reshape(rows, groups)
        values = np.ascontiguousarray(mxfp4.dequantize(blocks, scales).T)  # [in, hidden]
        values = apply_edits(values, edits)
        stored = np.ascontiguousarray(values.T)  # [hidden, in]
        new_blocks, new_scales = mxfp4.quantize(stored, hint=scales)
        codes = unpack_nibbles(new_blocks).reshape(rows, groups * 32)
        per_element = np.repeat(mxfp4.exponent_scale(new_scales), 32, axis=-1)
        _steered(stored, codes, per_element, edits, "e2m1", False)
        new_blocks = pack_nibbles(codes).reshape(rows, groups, 16)
        _write(fd_out, binfo, new_blocks, e * per_b)
        _write(fd_out, sinfo, new_scales, e * per_s)


def _nvfp4(fd_in: int, fd_out: int, tensors: dict, record: dict, edits: list[Edit]) -> None:
    import numpy as np

    from abliterate.quant import nvfp4
    from abliterate.quant.numerics import decode_e4m3, pack_nibbles, unpack_nibbles

    winfo, sinfo, ginfo = tensors[record["weight"]], tensors[record["scale"]], tensors[record["scale_2"]]
    rows, half = winfo.shape
    packed = _read(fd_in, winfo).reshape(rows, half)
    codes = _read(fd_in, sinfo).reshape(sinfo.shape)
    scale_2 = float(_floats(fd_in, ginfo)[0])
    values = apply_edits(nvfp4.dequantize(packed, codes, scale_2), edits)
    new_packed, new_codes, new_scale_2 = nvfp4.quantize(values, codes, scale_2)
    q = unpack_nibbles(new_packed)
    per_element = np.repeat(decode_e4m3(new_codes) * np.float32(new_scale_2), 16, axis=-1)
    _steered(values, q, per_element, edits, "e2m1", edits[0].layout == "rows")
    new_packed = pack_nibbles(q)
    _write(fd_out, winfo, new_packed)
    _write(fd_out, sinfo, new_codes)
    _write(fd_out, ginfo, np.full(ginfo.numel, new_scale_2, dtype=np.float32))


CODECS = {"fp8-block": _fp8, "fp8-scaled": _fp8, "mxfp4": _mxfp4, "nvfp4": _nvfp4}


def rewrite_quantized(base: Path, out: Path, grouped: dict[str, list[Edit]]) -> None:
    """Overwrite, in the copy ``out`` of shard ``base``, every quantized tensor of ``grouped`` (checked
    by :func:`check_stored`) with its edited codes and fresh scales."""
    from abliterate.formats.safetensors_io import read_header

    tensors = read_header(base).tensors
    fd_in = os.open(base, os.O_RDONLY)
    try:
        fd_out = os.open(out, os.O_WRONLY)
        try:
            for name in sorted(grouped):
                edits = grouped[name]
                CODECS[edits[0].storage["format"]](fd_in, fd_out, tensors, edits[0].storage, edits)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
