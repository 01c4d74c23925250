"""Direction-aware rounding: re-round a few elements so the quantization error leaves no trace of ``u``.

Re-quantizing an exactly edited writer ``W'`` (``u^T W' = 0``) adds an error ``E`` whose
component ``u^T E`` writes the removed direction back into the residual stream: about the
format's relative error times ``1/sqrt(hidden)`` of each column, which for 4-bit formats is a
sizeable share of what the edit removed. Every element of ``W'`` lies between two neighbours on its
grid; rounding it to the farther one instead moves ``c_j = u^T e_j`` (column ``j`` of ``E``) by
``u_i * (a_ij - q_ij)``. :func:`steer` makes a few greedy rounds: in each, every column flips the
one element that brings its ``|c_j|`` closest to zero (if any improves it), after a bulk pass that
flips, per column, the cheapest elements (those rounded nearest a midpoint) pushing ``c_j`` towards
zero, as many as bring it closest to zero (a wide column needs about ``sqrt(hidden)`` flips, since
one flip moves ``c_j`` by about ``step / sqrt(hidden)``); an element is flipped at most once, and never so that the column's relative norm error exceeds the largest one plain
rounding left in the matrix (norm preservation survives quantization as well as without steering).
Every element stays within one grid step of its float32 value, and the scales are untouched.
"""

from __future__ import annotations

ROUNDS = 3


def steer(values, codes, scales, u, magnitudes, sign_bit: int, rounds: int = ROUNDS):
    """Re-round ``codes`` (``[hidden, n]``, the residual axis first) in place; returns them.

    ``values``: the float32 targets; ``scales``: the float32 scale of every element (same shape);
    (or a function of a column slice giving those columns' scales, so no full-size copy is made);
    ``u``: the unit edit vector ``[hidden]``; ``magnitudes``: float32 value of each magnitude code
    (increasing from 0); ``sign_bit``: the code's sign bit (E4M3 ``0x80``, E2M1 ``0x8``).
    """
    import numpy as np

    step = slice_width(codes.shape[0])
    for start in range(0, codes.shape[1], step):
        part = slice(start, start + step)
        scale = scales(part) if callable(scales) else scales[:, part]
        codes[:, part] = _steer(values[:, part], codes[:, part], scale, u, magnitudes, sign_bit, rounds)
    return codes


def slice_width(hidden: int) -> int:
    """Columns steered together (their drift cap is shared): about 256K elements, so memory is bounded."""
    return max(1, (1 << 18) // max(hidden, 1))


def _steer(values, codes, scales, u, magnitudes, sign_bit: int, rounds: int):
    """One slice of columns; float32 per element, the per-column sums in float64."""
    import numpy as np

    mag = (codes & (sign_bit - 1)).astype(np.int16)
    sign = np.where(codes & sign_bit, np.float32(-1.0), np.float32(1.0))
    base = magnitudes[mag] * scales  # |q|: what de-quantization gives, float32
    target = np.abs(values)
    up, down = target > base, target < base  # the other neighbour is one code up (down)
    alt = mag + up.astype(np.int16) - down.astype(np.int16)
    valid = (up | down) & (alt >= 0) & (alt < len(magnitudes))
    alt = np.clip(alt, 0, len(magnitudes) - 1)
    other = magnitudes[alt] * scales
    gain = np.where(valid, np.asarray(u, np.float32)[:, None] * (sign * (other - base)), np.float32(0.0))
    moved = np.where(valid, other * other - base * base, np.float32(0.0))  # change of |column|^2 per flip
    c = np.asarray(u, np.float64) @ (sign * base - values)  # [n]: u . (quantized - float32)
    tn = np.sqrt(np.einsum("ij,ij->j", values, values, dtype=np.float64))
    sq = np.einsum("ij,ij->j", base, base, dtype=np.float64)  # |column|^2 as quantized now
    live = tn > 0
    worst = float((np.abs(np.sqrt(sq) - tn)[live] / tn[live]).max()) if live.any() else 0.0
    limit = np.maximum(np.abs(np.sqrt(sq) - tn), worst * tn) * (1 + 1e-9)  # relative drift cap
    lo2, hi2 = np.square(np.maximum(tn - limit, 0.0)), np.square(tn + limit)
    # Bulk pass: per column, the flips that push c_j towards zero, cheapest first (least added squared
    # error: elements rounded near a midpoint), as many as bring |c_j| closest to zero. A column whose
    # norm would leave its bound tries again with only the flips that move its norm towards the float32
    # one, then keeps plain rounding.
    todo = np.ones(codes.shape[1], dtype=bool)
    for norm_wise in (False, True):
        towards = valid & todo[None, :] & (gain != 0) & ((gain > 0) == (c < 0)[None, :])
        if norm_wise:
            towards &= (moved > 0) == (sq < tn * tn)[None, :]
        cost = np.where(towards, np.square(other - target) - np.square(base - target), np.inf)
        flip = np.zeros(codes.shape, dtype=bool)
        flip[_cheapest(cost, np.where(towards, np.abs(gain), np.float32(0.0)), np.abs(c), towards)] = True
        new_sq = sq + np.where(flip, moved, np.float32(0.0)).sum(axis=0, dtype=np.float64)
        fits = (new_sq >= lo2) & (new_sq <= hi2)
        flip &= fits[None, :]
        todo &= ~fits
        c += np.where(flip, gain, np.float32(0.0)).sum(axis=0, dtype=np.float64)
        sq = np.where(fits, new_sq, sq)  # the same sum as above, where it is kept
        np.copyto(mag, alt, where=flip)
        valid &= ~flip
        if not todo.any():
            break
    active = np.arange(codes.shape[1])
    for _ in range(rounds):
        if active.size == 0:
            break
        whole = active.size == codes.shape[1]
        g, m, ok = (gain, moved, valid) if whole else (gain[:, active], moved[:, active], valid[:, active])
        ca, after_sq = c[active], sq[active][None, :] + m
        ok = ok & (after_sq >= lo2[active]) & (after_sq <= hi2[active])
        after = np.where(ok, np.abs(ca[None, :] + g), np.inf)
        best = np.argmin(after, axis=0)  # the flip that brings |c_j| closest to zero
        improves = after[best, np.arange(active.size)] < np.abs(ca) * (1 - 1e-9)
        rows, cols = best[improves], active[improves]
        c[cols] += gain[rows, cols]
        sq[cols] += moved[rows, cols]
        mag[rows, cols] = alt[rows, cols]
        valid[rows, cols] = False
        active = active[improves]  # a column no flip improves is done
    return (mag.astype(np.uint8) | np.where(sign < 0, np.uint8(sign_bit), np.uint8(0))).astype(np.uint8)


def _cheapest(cost, pushed, need, towards):
    """The bulk pass's flips ``(rows, cols)``: per column, the elements in order of ``cost`` (stable: ties
    by row), as many as bring ``need - cumsum(pushed)`` closest to zero (the first such count).

    The stable argsort is one plain sort of unique int64 keys (the cost's bits made order-preserving,
    then the row), which numpy sorts with its vectorized sort; only the ``towards`` elements (finite
    cost) are ranked: the rest come last and push nothing.
    """
    import numpy as np

    hidden, n = cost.shape
    width = int(np.count_nonzero(towards, axis=0).max()) if n else 0
    if width == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    bits = np.ascontiguousarray(cost.T, dtype=np.float32).view(np.int32)  # [n, hidden]
    bits ^= (bits >> 31) & 0x7FFFFFFF  # negative floats reversed: int order is float order
    keys = bits.astype(np.int64)
    keys <<= 32
    keys |= np.arange(hidden, dtype=np.int64)  # ties by row: the stable order
    keys.sort(axis=1)
    ranked = keys[:, :width] & 0xFFFFFFFF  # [n, width] rows, cheapest first
    steps = np.take_along_axis(np.ascontiguousarray(pushed.T), ranked, axis=1)
    total = np.cumsum(steps, axis=1, dtype=np.float64)
    left = np.abs(need[:, None] - total)
    count = np.argmin(np.concatenate([need[:, None], left], axis=1), axis=1)  # flips to take, 0..width
    take = np.arange(width)[None, :] < count[:, None]
    return ranked[take], np.nonzero(take)[0]
