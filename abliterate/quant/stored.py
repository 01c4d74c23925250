"""A quantized target as stored in a shard, piece by piece: read, de-quantize, quantize, write.

A *piece* is the unit held in memory: the whole tensor (FP8, NVFP4) or one expert of a fused MXFP4
tensor. :func:`load` gives a piece's float32 values in the plan's layout (``columns``: ``[hidden,
in]``; ``rows``: ``[rows, hidden]``; MXFP4 experts are transposed from their stored ``[hidden,
in]``) with the old codes and scales (``state``); :func:`quantize` turns edited values back into
stored arrays (fresh scales, the old ones as hints; ``steer``: direction-aware rounding against
the edit vector ``u``, :mod:`abliterate.quant.steer`); :func:`dequantize` reads such arrays back
and :func:`store` writes them over the piece's bytes.
"""

from __future__ import annotations

E4M3, E2M1 = "e4m3", "e2m1"


def pieces(record: dict, tensors: dict) -> range:
    return range(tensors[record["blocks"]].shape[0] if record["format"] == "mxfp4" else 1)


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

    rows = 1 if not info.shape else info.numel // info.shape[-1]
    return read_rows(fd, info, 0, rows).astype(np.float32).reshape(-1)


def _as_dtype(values, dtype: str):
    """float32 values -> the storage array of a float ``dtype`` (bf16 rounded to nearest even)."""
    from abliterate.formats.safetensors_io import encode

    return encode(values.reshape(-1).astype("float32"), dtype)


def _mx_offsets(tensors: dict, record: dict, piece: int):
    binfo = tensors[record["blocks"]]
    _, rows, groups, _ = binfo.shape
    return rows, groups, piece * rows * groups * 16, piece * rows * groups


def load(fd: int, record: dict, tensors: dict, piece: int):
    """``(float32 values in the plan's layout, state)`` of one piece."""
    import numpy as np

    from abliterate.quant import fp8, mxfp4, nvfp4

    kind = record["format"]
    if kind == "mxfp4":
        rows, groups, ob, os_ = _mx_offsets(tensors, record, piece)
        blocks = _read(fd, tensors[record["blocks"]], ob, rows * groups * 16).reshape(rows, groups, 16)
        scales = _read(fd, tensors[record["scales"]], os_, rows * groups).reshape(rows, groups)
        return np.ascontiguousarray(mxfp4.dequantize(blocks, scales).T), {"scales": scales}
    winfo, sinfo = tensors[record["weight"]], tensors[record["scale"]]
    if kind == "nvfp4":
        packed = _read(fd, winfo).reshape(winfo.shape)
        codes = _read(fd, sinfo).reshape(sinfo.shape)
        scale_2 = float(_floats(fd, tensors[record["scale_2"]])[0])
        return nvfp4.dequantize(packed, codes, scale_2), {"codes": codes, "scale_2": scale_2}
    rows, cols = winfo.shape
    grid = fp8.grid_of(rows, cols, tuple(sinfo.shape), tuple(record["block"]) if "block" in record else None)
    codes, scales = _read(fd, winfo).reshape(rows, cols), _floats(fd, sinfo)
    return fp8.dequantize(codes, scales, *grid), {"scales": scales, "grid": grid, "scale_dtype": sinfo.dtype}


def quantize(record: dict, values, state: dict, u=None, layout: str = "columns", stored_layout: bool = False) -> dict:
    """Edited float32 values (the plan's layout) -> the piece's stored arrays; ``u``: steer against it.
    ``stored_layout``: an MXFP4 expert's values are already in the stored ``[hidden, in]`` layout."""
    import numpy as np

    from abliterate.formats.safetensors_io import decode
    from abliterate.quant import fp8, mxfp4, nvfp4
    from abliterate.quant.numerics import decode_e4m3, pack_nibbles, unpack_nibbles

    kind = record["format"]
    if kind == "mxfp4":
        stored = values if stored_layout else np.ascontiguousarray(values.T)  # [hidden, in]: the residual is the stored rows
        blocks, scales = mxfp4.quantize(stored, hint=state["scales"])
        if u is not None:
            codes = unpack_nibbles(blocks).reshape(stored.shape)

            def block_scales(part: slice):  # a column slice's scales, made on demand (no full-size copy)
                lo, hi, _ = part.indices(stored.shape[1])
                per = np.repeat(mxfp4.exponent_scale(scales[:, lo // 32: (hi - 1) // 32 + 1]), 32, axis=-1)
                return per[:, lo % 32: lo % 32 + hi - lo]

            _steer(stored, codes, block_scales, u, E2M1)
            blocks = pack_nibbles(codes).reshape(blocks.shape)
        return {"blocks": blocks, "scales": scales}
    flip = layout == "rows"  # the residual axis is the last one: steer the transposed views
    if kind == "nvfp4":
        packed, codes, scale_2 = nvfp4.quantize(values, state["codes"], state["scale_2"])
        if u is not None:
            q = unpack_nibbles(packed)
            per_element = np.repeat(decode_e4m3(codes) * np.float32(scale_2), 16, axis=-1)
            _steer(values.T if flip else values, q.T if flip else q, per_element.T if flip else per_element, u, E2M1)
            packed = pack_nibbles(q)
        return {"weight": packed, "scale": codes, "scale_2": np.full(1, scale_2, dtype=np.float32)}
    grid, dtype = state["grid"], state["scale_dtype"]

    def round_scale(candidate):  # what the scale's dtype will hold
        return decode(_as_dtype(candidate, dtype), dtype).astype(np.float32).reshape(candidate.shape)

    codes, scales = fp8.quantize(values, *grid, hint=state["scales"], round_scale=round_scale)
    if u is not None:
        (r, c), (bm, bn) = grid
        rows, cols = codes.shape

        def per_element(part: slice):  # the scales of a slice of the steered matrix's columns, made on demand
            if flip:  # the steered matrix is the transpose: its columns are the stored rows
                lo, hi, _ = part.indices(rows)
                return np.repeat(np.repeat(scales[lo // bm: (hi - 1) // bm + 1], bm, 0), bn, 1)[
                    lo % bm: lo % bm + hi - lo, :cols].T
            lo, hi, _ = part.indices(cols)
            return np.repeat(np.repeat(scales[:, lo // bn: (hi - 1) // bn + 1], bm, 0)[:rows], bn, 1)[
                :, lo % bn: lo % bn + hi - lo]

        _steer(values.T if flip else values, codes.T if flip else codes, per_element, u, E4M3)
    return {"weight": codes, "scale": _as_dtype(scales, dtype), "grid": grid, "scale_dtype": dtype}


def dequantize(record: dict, arrays: dict):
    """Stored arrays of a piece (from :func:`quantize`) -> float32 values in the plan's layout."""
    import numpy as np

    from abliterate.formats.safetensors_io import decode
    from abliterate.quant import fp8, mxfp4, nvfp4

    if record["format"] == "mxfp4":
        return np.ascontiguousarray(mxfp4.dequantize(arrays["blocks"], arrays["scales"]).T)
    if record["format"] == "nvfp4":
        return nvfp4.dequantize(arrays["weight"], arrays["scale"], float(arrays["scale_2"][0]))
    scales = decode(arrays["scale"], arrays["scale_dtype"]).astype(np.float32)
    return fp8.dequantize(arrays["weight"], scales, *arrays["grid"])


def store(fd: int, record: dict, tensors: dict, piece: int, arrays: dict) -> None:
    """Write a piece's stored arrays over its old bytes (same dtypes and sizes)."""
    from abliterate.formats.safetensors_io import write_at

    if record["format"] == "mxfp4":
        _, _, ob, os_ = _mx_offsets(tensors, record, piece)
        parts = [("blocks", ob), ("scales", os_)]
    else:
        parts = [(k, 0) for k in ("weight", "scale", "scale_2") if k in record]
    for key, offset in parts:
        info, raw = tensors[record[key]], memoryview(arrays[key].tobytes())
        if offset + len(raw) > info.nbytes:
            raise ValueError(f"write outside tensor {info.name}")
        write_at(fd, raw, info.begin + offset)


def _steer(values, codes, scales, u, grid: str) -> None:
    """:func:`abliterate.quant.steer.steer` with the grid's magnitudes (``values`` etc. residual axis first)."""
    import numpy as np

    from abliterate.quant.numerics import E2M1_VALUES, e4m3_table
    from abliterate.quant.steer import steer

    magnitudes = e4m3_table()[:0x7F] if grid == E4M3 else np.array(E2M1_VALUES, dtype=np.float32)
    steer(values, codes, scales, np.asarray(u, dtype=np.float64), magnitudes, 0x80 if grid == E4M3 else 0x8)
