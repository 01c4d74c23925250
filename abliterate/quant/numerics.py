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
_E2M1_CODE_OF_TWICE = None  # the code of each E2M1 magnitude, indexed by twice the magnitude (made once)


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
    """Finite float32 values -> E2M1 codes (uint8 0-15), saturating to +-6, ties to the even code.

    The magnitude is rounded to the grid (:func:`nearest_e2m1`); twice a grid value (0, 1, 2, 3, 4,
    6, 8, 12) is an exact small integer, which a table turns into the code."""
    import numpy as np

    global _E2M1_CODE_OF_TWICE
    if _E2M1_CODE_OF_TWICE is None:
        _E2M1_CODE_OF_TWICE = np.zeros(13, dtype=np.uint8)
        _E2M1_CODE_OF_TWICE[[int(2 * v) for v in E2M1_VALUES]] = np.arange(8, dtype=np.uint8)
    values = np.asarray(values, dtype=np.float32)
    twice = nearest_e2m1(np.abs(values))
    twice *= np.float32(2.0)
    codes = _E2M1_CODE_OF_TWICE[twice.astype(np.uint8)]
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


def nearest_e4m3(mag, scratch=None):
    """Non-negative float32 magnitudes -> the nearest E4M3 value (saturating at 448, ties to even), in place.

    The value ``decode_e4m3(encode_e4m3(mag))`` without codes: adding ``M = 2**(e + 20)``, ``e`` the
    binade of ``mag`` (at least -6, the subnormals' one), leaves ``ulp(M) = 2**(e - 3)``, the E4M3
    step there, so float32 addition rounds to the grid (ties to the even code) and ``- M`` is exact.
    ``scratch``: a float32 buffer of ``mag``'s shape (none allocated per call then).
    """
    import numpy as np

    np.minimum(mag, np.float32(E4M3_MAX), out=mag)
    return _round_to_grid(mag, 0x3C800000, 20, scratch)  # 2**-6: the first normal binade


def nearest_e2m1(mag, scratch=None):
    """Non-negative float32 magnitudes -> the nearest E2M1 value (saturating at 6, ties to the even code),
    in place; the same trick as :func:`nearest_e4m3` with one mantissa bit and the binade of 1 as the floor."""
    import numpy as np

    np.minimum(mag, np.float32(E2M1_MAX), out=mag)
    return _round_to_grid(mag, 0x3F800000, 22, scratch)


def _round_to_grid(mag, floor_bits: int, shift: int, scratch):
    """``mag + M - M`` with ``M = 2**(max(binade(mag), binade(floor)) + shift)`` (float32, in place)."""
    import numpy as np

    magic = np.empty_like(mag) if scratch is None else scratch
    bits, mbits = mag.view(np.int32), magic.view(np.int32)
    np.maximum(bits, floor_bits, out=mbits)
    np.bitwise_and(mbits, 0x7F800000, out=mbits)  # the binade's power of two
    np.add(mbits, shift << 23, out=mbits)
    mag += magic
    mag -= magic
    return mag


BLOCKS_AT_ONCE = 1 << 16  # elements per step of :func:`best_codes`: its few buffers stay in the L2 cache


def best_codes(blocks, candidates: Sequence, encode: Callable, nearest: Callable, top: tuple[float, float]):
    """Per block, the codes of the candidate scale with the least squared error.

    ``blocks``: float32 ``[..., n]`` (one block per leading index); ``candidates``: float32 scale
    arrays of the leading shape ``[...]`` (the values as de-quantization will use them); a value is
    stored as ``code = encode(x / scale)`` and read back as ``decode(code) * scale`` (float32);
    ``nearest``: magnitudes -> the grid's nearest value in place (:func:`nearest_e4m3`), i.e.
    ``|decode(encode(x))|``, so the candidates' errors are measured without encoding each
    (the squared error is the same on magnitudes: rounding is symmetric).
    ``top``: the grid's largest value and its spacing there (E4M3: 448, 32; E2M1: 6, 2): a
    candidate may clip a block's largest value by at most that one step, so every element ends
    within one grid step of its float32 value. A zero, non-finite or clipping candidate is
    skipped for its block unless nothing else is left (then the last one is used).
    Blocks are independent: a few thousand elements are searched at a time, in cache.
    Returns ``(codes [..., n] uint8, chosen candidate index [...], squared error [...] fp64)``.
    """
    import numpy as np

    lead, n = blocks.shape[:-1], blocks.shape[-1]
    flat = np.ascontiguousarray(blocks, dtype=np.float32).reshape(-1, n)  # [B, n]
    cands = [np.broadcast_to(np.asarray(c, dtype=np.float32), lead).reshape(-1) for c in candidates]
    count = flat.shape[0]
    chosen = np.zeros(count, dtype=np.int64)
    best_err = np.full(count, np.inf)
    codes = np.empty(flat.shape, dtype=np.uint8)
    step = max(1, BLOCKS_AT_ONCE // max(n, 1))
    mag, work, scratch = (np.empty((min(step, count), n), dtype=np.float32) for _ in range(3))
    for a in range(0, count, step):
        b = min(a + step, count)
        x, m, w, s = flat[a:b], mag[: b - a], work[: b - a], scratch[: b - a]
        np.abs(x, out=m)
        amax = m.max(axis=-1).astype(np.float64)
        err_best, pick = best_err[a:b], chosen[a:b]  # views: updated in place
        safe_best = np.ones(b - a, dtype=np.float32)
        for index, scale in enumerate(cands):
            scale = scale[a:b]
            usable = np.isfinite(scale) & (scale > 0) & (amax <= (top[0] + top[1]) * scale.astype(np.float64))
            safe = np.where(usable, scale, np.float32(1.0))
            np.divide(m, safe[:, None], out=w)
            nearest(w, s)
            w *= np.where(usable, scale, np.float32(0.0))[:, None]
            w -= m  # |x| read back less |x|: the element's error up to its sign
            err = np.einsum("...i,...i->...", w, w, dtype=np.float64)
            err = np.where(usable | (index == len(cands) - 1), err, np.inf)
            better = err < err_best
            err_best[better] = err[better]
            pick[better] = index
            safe_best[better] = safe[better]
        codes[a:b] = encode(np.divide(x, safe_best[:, None], out=w))  # once, at the chosen scale
    return codes.reshape(blocks.shape), chosen.reshape(lead), best_err.reshape(lead)

