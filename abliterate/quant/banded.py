"""Block-scaled FP8 writers edited a band of columns at a time: float32 is held for one band only.

For the ``columns`` layout (a writer ``W [hidden, in]``, the residual along the rows) every step of
the quantized edit works column by column: the edit's sums ``u . w_j`` and ``|w_j|^2`` and its
coefficients (:mod:`abliterate.linalg`), the scale search of the ``bm x bn`` blocks (a band holds
whole block columns) and the steering (:mod:`abliterate.quant.steer`, which shares a drift cap
within slices of :func:`~abliterate.quant.steer.slice_width` columns). A band is a multiple of both
widths. Two passes: the edit's column sums are taken first over the whole tensor's row chunks, on
the same arrays as for the whole tensor (de-quantized a chunk of rows at a time), then each band is
edited (element-wise), quantized and steered. So the codes and scales are the bytes the whole tensor
edited at once gives (tested), while memory holds the codes (rewritten in place: one byte per
element) and one band in float32 instead of four bytes per element of the tensor.
"""

from __future__ import annotations

import math

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


def edit_fp8_columns(fd_in: int, record: dict, tensors: dict, edits: list[Edit], u=None) -> dict:
    """The stored arrays of an edited block-scaled FP8 writer (as :func:`abliterate.quant.stored.quantize`
    gives them), in two passes: the edit's column sums over row chunks (:func:`_coefficients`), then
    band by band the edit, the scale search and the steering against ``u`` (``None``: plain rounding)."""
    import numpy as np

    from abliterate.formats.safetensors_io import decode
    from abliterate.linalg import apply_columns
    from abliterate.quant import fp8, stored

    winfo, sinfo = tensors[record["weight"]], tensors[record["scale"]]
    rows, cols = winfo.shape
    grid = fp8.grid_of(rows, cols, tuple(sinfo.shape), tuple(record["block"]))
    (r, c), (bm, bn) = grid
    codes = stored._read(fd_in, winfo).reshape(rows, cols)  # old codes; each band's new ones replace them
    scales = stored._floats(fd_in, sinfo).reshape(r, c)
    uc, coef, f = _coefficients(codes, scales, grid, edits)
    fresh = np.empty_like(scales)
    width = band_width(rows, cols, bn)
    for a in range(0, cols, width):
        b = min(a + width, cols)
        blocks = slice(a // bn, math.ceil(b / bn))
        band_grid = ((r, blocks.stop - blocks.start), (bm, bn))
        values = apply_columns(fp8.dequantize(codes[:, a:b], scales[:, blocks], *band_grid), uc, coef[:, a:b], f[a:b])
        state = {"scales": scales[:, blocks], "grid": band_grid, "scale_dtype": sinfo.dtype}
        arrays = stored.quantize(record, values, state, u, "columns")
        codes[:, a:b] = arrays["weight"]
        fresh[:, blocks] = decode(arrays["scale"], sinfo.dtype).reshape(r, -1)
    return {"weight": codes, "scale": stored._as_dtype(fresh, sinfo.dtype), "grid": grid, "scale_dtype": sinfo.dtype}


def _coefficients(codes, scales, grid, edits: list[Edit]):
    """Pass 1: ``(u float32 [rows, T], B float32 [T, cols], F float32 [cols])`` of the edit
    ``W diag(F) + U B`` (:func:`abliterate.linalg.column_coefficients`), the sums taken over the very
    row chunks (and arrays) :func:`abliterate.quant.rewrite.apply_edits` uses on the whole tensor."""
    import numpy as np

    from abliterate.errors import fail
    from abliterate.formats.safetensors_io import CHUNK_ELEMENTS
    from abliterate.linalg import column_coefficients, column_stats
    from abliterate.quant.numerics import decode_e4m3

    (_, _), (bm, bn) = grid
    rows, cols = codes.shape
    u = np.stack([np.asarray(e.vector, dtype=np.float64) for e in edits], axis=1)  # [rows, T]
    uc = u.astype(np.float32)
    g, n2 = np.zeros((u.shape[1], cols)), np.zeros(cols)
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for a in range(0, rows, step):
        b = min(a + step, rows)
        per_element = np.repeat(np.repeat(scales[a // bm: (b - 1) // bm + 1], bm, 0)[a % bm: a % bm + b - a], bn, 1)
        chunk = decode_e4m3(codes[a:b]) * per_element[:, :cols]  # what fp8.dequantize gives for these rows
        if not np.isfinite(chunk).all():
            fail(f"tensor {edits[0].tensor} de-quantizes to NaN or infinite values; the checkpoint is damaged")
        part_g, part_n2 = column_stats(chunk, uc[a:b])
        g += part_g
        n2 += part_n2
    coef, f = column_coefficients(g, n2, u, [e.scale for e in edits], [e.norm_preserve for e in edits])
    return uc, coef.astype(np.float32), f.astype(np.float32)
