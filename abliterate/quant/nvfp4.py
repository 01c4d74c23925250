"""NVFP4 (NVIDIA ModelOpt layout): packed E2M1 ``weight``, E4M3 ``weight_scale``, float32 ``weight_scale_2``.

``weight`` is uint8 ``[rows, cols / 2]`` (two E2M1 codes per byte, the even element in the low
nibble), ``weight_scale`` float8_e4m3fn ``[rows, cols / 16]`` (one per 16 values along a row) and
``weight_scale_2`` a float32 scalar for the whole tensor:
``value = e2m1(code) * (e4m3(weight_scale) * weight_scale_2)``, the block scale product in float32.

Fresh scales (:func:`quantize`): the tensor scale candidates are the old one (a hint) and the
max-based ``amax / (6 * 448)``. For each, every block tries its old E4M3 scale code, the code
nearest ``amax_block / 6 / weight_scale_2`` and its two neighbours on the E4M3 grid, and keeps the
least squared error; the tensor scale with the least total error wins.
"""

from __future__ import annotations

BLOCK = 16


def dequantize(packed, scale_codes, scale_2: float):
    """uint8 ``[rows, cols/2]``, E4M3 codes ``[rows, cols/16]``, float32 scalar -> float32 ``[rows, cols]``."""
    import numpy as np

    from abliterate.quant.numerics import decode_e2m1, decode_e4m3, unpack_nibbles

    rows = packed.shape[0]
    values = decode_e2m1(unpack_nibbles(packed)).reshape(rows, -1, BLOCK)
    block_scale = decode_e4m3(scale_codes) * np.float32(scale_2)
    return (values * block_scale[..., None]).reshape(rows, -1)


def quantize(values, hint_codes=None, hint_scale_2: float | None = None):
    """float32 ``[rows, cols]`` -> ``(packed uint8 [rows, cols/2], scale codes uint8 [rows, cols/16], scale_2)``."""
    import numpy as np

    from abliterate.quant.numerics import (E2M1_MAX, E4M3_MAX, best_codes, decode_e4m3, encode_e2m1, encode_e4m3,
                                           nearest_e2m1)

    rows, cols = values.shape
    blocks = np.asarray(values, np.float32).reshape(rows, cols // BLOCK, BLOCK)
    amax = np.abs(blocks).max(axis=-1)  # [rows, cols/16]
    top = float(amax.max()) if amax.size else 0.0
    fresh = np.float32(top / (E2M1_MAX * E4M3_MAX)) if top > 0 else np.float32(1.0)
    globals_ = [fresh] if hint_scale_2 is None else [np.float32(hint_scale_2), fresh]
    best = None
    for scale_2 in globals_:
        if not (np.isfinite(scale_2) and scale_2 > 0):
            continue
        nearest = encode_e4m3(amax / np.float32(E2M1_MAX) / scale_2).astype(np.int64)  # saturates at 448
        codes = [] if hint_codes is None else [np.asarray(hint_codes).astype(np.int64)]
        codes += [nearest, np.minimum(nearest + 1, 0x7E), np.maximum(nearest - 1, 0)]
        candidates = [decode_e4m3(c.astype(np.uint8)) * scale_2 for c in codes]
        q, chosen, err = best_codes(blocks, candidates, encode_e2m1, nearest_e2m1, (E2M1_MAX, 2.0))
        total = float(err.sum())
        if best is None or total < best[0]:
            best = (total, q, np.choose(chosen, codes).astype(np.uint8), float(scale_2))
    _, q, scale_codes, scale_2 = best
    from abliterate.quant.numerics import pack_nibbles

    return pack_nibbles(q.reshape(rows, cols)), scale_codes, scale_2
