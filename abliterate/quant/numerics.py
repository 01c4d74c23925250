"""Element grids of the quantized formats and the per-block scale search, in numpy.

* E4M3 (``float8_e4m3fn``): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinity, codes
  ``0x7F``/``0xFF`` are NaN, largest finite 448, subnormals step ``2**-9``. Encoding rounds to
  nearest, ties to even (as torch's cast), after saturating to +-448.
* E2M1 (FP4): magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (codes 0-7), bit 3 the sign; encoding rounds
  to nearest, ties to the even code, saturating at 6. Two codes per byte, the element with the
  even index in the low nibble.
* E8M0: a byte ``b`` is the scale ``2**(b - 127)`` (255 is NaN, never written).

:func:`best_codes` picks, per block, the candidate scale whose de-quantized block has the least
squared error against the float32 values (ties: the earlier candidate), so a block keeps its old
scale whenever that is at least as good as a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E8M0_BIAS = 127
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between code i and i + 1
BAND = 1 << 22  # elements per band in :func:`best_codes`


def e4m3_table():
    """The float32 value of every E4M3 code (``[256]``; NaN at ``0x7F`` and ``0xFF``)."""
    import numpy as np

    codes = np.arange(256)
    exp, man = (codes >> 3) & 0xF, (codes & 7).astype(np.float64)
    mag = np.where(exp == 0, man * 2.0**-9, (1.0 + man / 8.0) * np.exp2(exp - 7.0))
    values = np.where(codes >> 7, -mag, mag)
    values[[0x7F, 0xFF]] = np.nan
    return values.astype(np.float32)


_E4M3 = None


def decode_e4m3(codes):
    """E4M3 codes (uint8, any shape) -> float32 values."""
    global _E4M3
    if _E4M3 is None:
        _E4M3 = e4m3_table()
    return _E4M3[codes]


def encode_e4m3(values):
    """Finite float32 values -> E4M3 codes (uint8), saturating to +-448, round to nearest even.

    On the float32 bits: adding ``0x7FFFF`` plus the lowest kept bit and dropping 20 mantissa bits
    rounds to 3 mantissa bits, ties to even (a carry moves into the exponent, as it should); the
    exponent bias goes from 127 to 7. Magnitudes below ``2**-6`` are E4M3 subnormals: multiples of ``2**-9``.
    """
    import numpy as np

    values = np.asarray(values, dtype=np.float32)
    mag = np.minimum(np.abs(values), np.float32(E4M3_MAX))
    bits = mag.view(np.int32)  # non-negative: int32 shifts are the fast ones
    normal = ((bits + (0x7FFFF + ((bits >> 20) & 1))) >> 20) - (120 << 3)
    small = mag < np.float32(2.0**-6)
    codes = np.where(small, np.rint(mag * np.float32(512.0)).astype(np.int32), normal).astype(np.uint8)
    return codes | (np.signbit(values).astype(np.uint8) << 7)


def decode_e2m1(codes):
    """E2M1 codes (uint8 0-15) -> float32 values."""
    import numpy as np

    table = np.array(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=np.float32)
    return table[codes]


def encode_e2m1(values):
    """Finite float32 values -> E2M1 codes (uint8 0-15), saturating to +-6, ties to the even code."""
    import numpy as np

    values = np.asarray(values, dtype=np.float32)
    mag = np.abs(values)
    mids = np.array(E2M1_MIDPOINTS, dtype=np.float32)
    low = np.searchsorted(mids, mag, side="left")  # the lower code on a tie
    high = np.searchsorted(mids, mag, side="right")  # the upper code on a tie
    codes = np.where((low != high) & (low % 2 == 1), high, low).astype(np.uint8)  # a tie goes to the even code
    return codes | (np.signbit(values).astype(np.uint8) << 3)


def unpack_nibbles(packed):
    """``[..., n]`` bytes -> ``[..., 2n]`` codes: the low nibble first (even index), then the high one."""
    import numpy as np

    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def pack_nibbles(codes):
    """``[..., 2n]`` codes (0-15) -> ``[..., n]`` bytes (inverse of :func:`unpack_nibbles`)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype("uint8")


def best_codes(blocks, candidates: Sequence, encode: Callable, decode: Callable, top: tuple[float, float]):
    """Per block, the codes of the candidate scale with the least squared error.

    ``blocks``: float32 ``[..., n]`` (one block per leading index); ``candidates``: float32 scale
    arrays of the leading shape ``[...]`` (the values as de-quantization will use them); a value is
    stored as ``code = encode(x / scale)`` and read back as ``decode(code) * scale`` (float32).
    ``top``: the grid's largest value and its spacing there (E4M3: 448, 32; E2M1: 6, 2): a
    candidate may clip a block's largest value by at most that one step, so every element ends
    within one grid step of its float32 value. A zero, non-finite or clipping candidate is
    skipped for its block unless nothing else is left (then the last one is used).
    Returns ``(codes [..., n] uint8, chosen candidate index [...], squared error [...] fp64)``.
    """
    import numpy as np

    lead = blocks.shape[:-1]
    candidates = [np.broadcast_to(np.asarray(c, dtype=np.float32), lead) for c in candidates]
    step = max(1, BAND // max(blocks[:1].size, 1)) if lead else 1
    if lead and lead[0] > step:  # blocks are independent: a band at a time keeps the temporaries small
        parts = [best_codes(blocks[a:a + step], [c[a:a + step] for c in candidates], encode, decode, top)
                 for a in range(0, lead[0], step)]
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
    amax = np.abs(blocks).max(axis=-1).astype(np.float64)
    best = np.zeros(blocks.shape, dtype=np.uint8)
    best_err = np.full(lead, np.inf)
    chosen = np.zeros(lead, dtype=np.int64)
    for index, scale in enumerate(candidates):
        scale = np.broadcast_to(np.asarray(scale, dtype=np.float32), lead)
        usable = np.isfinite(scale) & (scale > 0) & (amax <= (top[0] + top[1]) * scale.astype(np.float64))
        safe = np.where(usable, scale, np.float32(1.0))[..., None]
        codes = encode(blocks / safe)
        back = decode(codes)
        back *= np.where(usable, scale, np.float32(0.0))[..., None]
        back -= blocks
        err = np.einsum("...i,...i->...", back, back, dtype=np.float64)
        err = np.where(usable | (index == len(candidates) - 1), err, np.inf)
        better = err < best_err
        best[better] = codes[better]
        best_err = np.where(better, err, best_err)
        chosen = np.where(better, index, chosen)
    return best, chosen, best_err
