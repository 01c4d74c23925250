"""MXFP4 as gpt-oss stores its experts: ``*_blocks`` and ``*_scales``.

``x_blocks`` is uint8 ``[E, rows, G, 16]``: for each expert and each row, ``G`` blocks of 32 E2M1
values along the row, two per byte (the even element in the low nibble); ``x_scales`` is uint8
``[E, rows, G]``, one E8M0 exponent per block: ``value = e2m1(code) * 2**(byte - 127)``. The rows
are the *output* features of the projection, so the quantized ``down_proj`` of gpt-oss is
``[E, hidden, intermediate]`` while its bf16 tensor is ``[E, intermediate, hidden]``: the edit
(layout ``rows`` on the bf16 layout) runs on each expert's de-quantized matrix transposed.

Fresh scales (:func:`quantize`): per block, the candidates are the old exponent (a hint), the
smallest exponent that does not clip (``ceil(log2(amax / 6))``) and the one below it (values above
``6 * 2**e`` saturate, the rest get twice the resolution; allowed only where it clips by at most one
grid step, i.e. ``amax <= 8 * 2**e``); the least squared error wins.
"""

from __future__ import annotations

BLOCK = 32


def dequantize(blocks, scales):
    """uint8 ``[..., G, 16]`` and ``[..., G]`` -> float32 ``[..., G * 32]``."""
    import numpy as np

    from abliterate.quant.numerics import E8M0_BIAS, decode_e2m1, unpack_nibbles

    values = decode_e2m1(unpack_nibbles(blocks))  # [..., G, 32]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - E8M0_BIAS, out=values)
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK)


def exponent_scale(exponents):
    """E8M0 bytes -> float32 scales."""
    import numpy as np

    from abliterate.quant.numerics import E8M0_BIAS

    return np.ldexp(np.float32(1.0), np.asarray(exponents, np.int32) - E8M0_BIAS).astype(np.float32)


def quantize(values, hint=None):
    """float32 ``[..., K]`` (``K`` a multiple of 32) -> ``(blocks uint8 [..., K/32, 16], scales uint8 [..., K/32])``.

    ``hint``: the old exponents ``[..., K/32]`` (uint8), tried first.
    """
    import numpy as np

    from abliterate.quant.numerics import E2M1_MAX, best_codes, encode_e2m1, nearest_e2m1, pack_nibbles

    blocks = np.asarray(values, np.float32).reshape(*values.shape[:-1], values.shape[-1] // BLOCK, BLOCK)
    amax = np.abs(blocks).max(axis=-1).astype(np.float64)
    with np.errstate(divide="ignore"):
        top = np.where(amax > 0, np.ceil(np.log2(amax / E2M1_MAX)), -127.0) + 127  # no value clips
    top = np.clip(top, 1, 254).astype(np.int64)
    exponents = [] if hint is None else [np.asarray(hint).astype(np.int64)]
    exponents += [top, top - 1]
    candidates = [exponent_scale(e) for e in exponents]
    codes, chosen, _ = best_codes(blocks, candidates, encode_e2m1, nearest_e2m1, (E2M1_MAX, 2.0))
    scales = np.choose(chosen, exponents).astype(np.uint8)
    return pack_nibbles(codes), scales
