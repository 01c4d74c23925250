"""Block-scaled FP8 writers edited a band of columns at a time: float32 is held for one band only.

For the ``columns`` layout (a writer ``W [hidden, in]``, the residual along the rows) every step of
the quantized edit works column by column: the edit's sums ``u . w_j`` and ``|w_j|^2`` and its
coefficients (:mod:`abliterate.linalg`), the scale search of the ``bm x bn`` blocks (a band holds
whole block columns) and the steering (:mod:`abliterate.quant.steer`, which shares a drift cap
within slices of :func:`~abliterate.quant.steer.slice_width` columns). A band is a multiple of both
widths and the edit keeps the whole tensor's row chunks, so the codes and scales are the bytes the
whole tensor edited at once gives (tested), while memory holds the codes (rewritten in place: one
byte per element) and one band in float32 instead of four bytes per element of the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from abliterate.records import Edit

BAND_ELEMENTS = 1 << 20  # float32 elements of a band (4 MB): its temporaries stay small


def band_width(rows: int, cols: int, block_cols: int) -> int | None:
    """Columns per band of a ``[rows, cols]`` writer with blocks ``block_cols`` wide; ``None``: one band."""
    from abliterate.quant.steer import slice_width

    unit = math.lcm(block_cols, slice_width(rows))
    width = unit * max(1, BAND_ELEMENTS // max(unit * rows, 1))
    return width if width < cols else None


def applies(record: dict, tensors: dict, layout: str) -> bool:
    """A block-scaled FP8 writer (``columns`` layout) wider than one band."""
    from abliterate.quant.fp8 import grid_of

    if record.get("format") != "fp8-block" or layout != "columns":
        return False
    rows, cols = tensors[record["weight"]].shape
    grid = grid_of(rows, cols, tuple(tensors[record["scale"]].shape), tuple(record["block"]))
    return grid is not None and band_width(rows, cols, grid[1][1]) is not None


def edit_fp8_columns(fd_in: int, record: dict, tensors: dict, edits: list[Edit], apply: Callable, u=None) -> dict:
    """The stored arrays of an edited block-scaled FP8 writer (as :func:`abliterate.quant.stored.quantize`
    gives them), computed band by band. ``apply(values, edits, rows_per_chunk)``: the float32 edit
    (:func:`abliterate.quant.rewrite.apply_edits`); ``u``: steer against it (``None``: plain rounding)."""
    import numpy as np

    from abliterate.formats.safetensors_io import CHUNK_ELEMENTS, decode
    from abliterate.quant import fp8, stored

    winfo, sinfo = tensors[record["weight"]], tensors[record["scale"]]
    rows, cols = winfo.shape
    grid = fp8.grid_of(rows, cols, tuple(sinfo.shape), tuple(record["block"]))
    (r, c), (bm, bn) = grid
    codes = stored._read(fd_in, winfo).reshape(rows, cols)  # old codes; each band's new ones replace them
    scales = stored._floats(fd_in, sinfo).reshape(r, c)
    fresh = np.empty_like(scales)
    chunk_rows = max(1, CHUNK_ELEMENTS // max(cols, 1))  # the whole tensor's row chunks (same sums)
    width = band_width(rows, cols, bn)
    for a in range(0, cols, width):
        b = min(a + width, cols)
        blocks = slice(a // bn, math.ceil(b / bn))
        band_grid = ((r, blocks.stop - blocks.start), (bm, bn))
        values = apply(fp8.dequantize(codes[:, a:b], scales[:, blocks], *band_grid), edits, chunk_rows)
        state = {"scales": scales[:, blocks], "grid": band_grid, "scale_dtype": sinfo.dtype}
        arrays = stored.quantize(record, values, state, u, "columns")
        codes[:, a:b] = arrays["weight"]
        fresh[:, blocks] = decode(arrays["scale"], sinfo.dtype).reshape(r, -1)
    return {"weight": codes, "scale": stored._as_dtype(fresh, sinfo.dtype), "grid": grid, "scale_dtype": sinfo.dtype}
