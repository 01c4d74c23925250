"""FP8 (E4M3) weights with float scales: block-scaled and per-tensor / per-channel.

One rule covers the three layouts: the weight ``[rows, cols]`` is cut into a grid ``[R, C]`` of
blocks ``bm x bn`` (the last row and column of blocks may be partial: ``R = ceil(rows / bm)``),
and every element is ``value = e4m3(code) * scale[block]`` in float32.

* block-scaled (``quant_method: fp8``, DeepSeek-V3, Qwen3-FP8): ``weight_scale_inv`` float32
  ``[ceil(rows/128), ceil(cols/128)]`` for ``weight_block_size [128, 128]``; despite its name it
  is the multiplier of the codes (the inverse of the scale the weights were divided by);
* per-tensor (``compressed-tensors``, strategy ``tensor``): ``weight_scale`` of shape ``[]`` or
  ``[1]``: one block;
* per-channel (strategy ``channel``): ``weight_scale [rows, 1]``: one block per row.

Fresh scales (:func:`quantize`): per block, the candidates are the block's old scale (a hint), the
max-based scale ``amax / 448`` and that scale times ``2**(k/16)`` for ``k = -1, 1, 2`` (the smaller one
clips the largest values by less than one grid step but can place the others better on the grid);
the one whose de-quantized block has the least squared error is kept
(:func:`abliterate.quant.numerics.best_codes`, which never lets a candidate clip by more than one step).
Scales stored in bf16/fp16 are rounded to that dtype before they are tried, so the search sees
what de-quantization will.
"""

from __future__ import annotations

FACTORS = (1.0, 2.0 ** (-1 / 16), 2.0 ** (1 / 16), 2.0 ** (2 / 16))


def grid_of(rows: int, cols: int, scale_shape: tuple[int, ...], block: tuple[int, int] | None):
    """``((R, C), (bm, bn))`` for a weight ``[rows, cols]`` and a scale of ``scale_shape``, or ``None``
    if the two do not fit together. ``block``: the configured block size (block-scaled), else ``None``."""
    import math

    if len(scale_shape) == 0 or scale_shape in ((1,), (1, 1)):
        return (1, 1), (rows, cols)
    if len(scale_shape) != 2:
        return None
    if block is None:  # per-channel [rows, 1] (or any grid dividing the weight evenly)
        r, c = scale_shape
        if rows % r or cols % c:
            return None
        return (r, c), (rows // r, cols // c)
    bm, bn = block
    if tuple(scale_shape) != (math.ceil(rows / bm), math.ceil(cols / bn)):
        return None
    return tuple(scale_shape), (bm, bn)


def _blocks(values, grid, block):
    """``[rows, cols]`` -> ``[R, C, bm * bn]`` float32 (zero padded: zeros cost no error at any scale)."""
    import numpy as np

    (r, c), (bm, bn) = grid, block
    rows, cols = values.shape
    padded = np.zeros((r * bm, c * bn), dtype=np.float32)
    padded[:rows, :cols] = values
    return padded.reshape(r, bm, c, bn).transpose(0, 2, 1, 3).reshape(r, c, bm * bn)


def _unblocks(blocks, grid, block, shape):
    (r, c), (bm, bn) = grid, block
    full = blocks.reshape(r, c, bm, bn).transpose(0, 2, 1, 3).reshape(r * bm, c * bn)
    return full[: shape[0], : shape[1]]


BAND = 1 << 22  # elements quantized at a time: the candidates' temporaries stay a few tens of MB


def _bands(grid, block, cols: int):
    """Row ranges ``(block row from, block row to)`` of about :data:`BAND` elements each."""
    (r, _), (bm, _) = grid, block
    step = max(1, BAND // max(bm * cols, 1))
    return [(a, min(a + step, r)) for a in range(0, r, step)]


def dequantize(codes, scales, grid, block):
    """E4M3 codes ``[rows, cols]`` (uint8) and float32 scales (``grid`` elements) -> float32 values."""
    import numpy as np

    from abliterate.quant.numerics import decode_e4m3

    (r, c), (bm, bn) = grid, block
    rows, cols = codes.shape
    scales = np.asarray(scales, np.float32).reshape(r, c)
    out = np.empty((rows, cols), dtype=np.float32)
    for a, b in _bands(grid, block, cols):
        lo, hi = a * bm, min(b * bm, rows)
        per_element = np.repeat(np.repeat(scales[a:b], bm, 0)[: hi - lo], bn, 1)[:, :cols]
        np.multiply(decode_e4m3(codes[lo:hi]), per_element, out=out[lo:hi])
    return out


def quantize(values, grid, block, hint=None, round_scale=None):
    """float32 ``[rows, cols]`` -> ``(codes uint8 [rows, cols], scales float32 [R, C])``, fresh scales.

    ``hint``: the old scales (float32, ``grid`` elements), tried first; ``round_scale``: rounds
    candidate scales to their storage dtype (``None``: float32). Bands of block rows are searched
    one at a time (blocks are independent), so memory stays near the codes' size.
    """
    import numpy as np

    from abliterate.quant.numerics import E4M3_MAX, best_codes, encode_e4m3, nearest_e4m3

    (r, c), (bm, bn) = grid, block
    rows, cols = values.shape
    codes = np.empty((rows, cols), dtype=np.uint8)
    scales = np.empty((r, c), dtype=np.float32)
    hint = None if hint is None else np.asarray(hint, np.float32).reshape(r, c)
    for a, b in _bands(grid, block, cols):
        lo, hi = a * bm, min(b * bm, rows)
        band_grid = ((b - a, c), block)
        blocks = _blocks(values[lo:hi], *band_grid)
        amax = np.abs(blocks).max(axis=-1)  # [band, C]
        base = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)
        candidates = [] if hint is None else [hint[a:b]]
        candidates += [(base * np.float32(f)).astype(np.float32) for f in FACTORS]
        if round_scale is not None:
            candidates = [round_scale(x) for x in candidates]
        found, chosen, _ = best_codes(blocks, candidates, encode_e4m3, nearest_e4m3, (E4M3_MAX, 32.0))
        scales[a:b] = np.choose(chosen, candidates)
        codes[lo:hi] = _unblocks(found, *band_grid, (hi - lo, cols))
    return codes, scales
