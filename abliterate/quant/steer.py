"""Direction-aware rounding: re-round a few elements so the quantization error leaves no trace of ``u``.

Re-quantizing an exactly edited writer ``W'`` (``u^T W' = 0``) adds an error ``E`` whose
component ``u^T E`` writes the removed direction back into the residual stream: about the
format's relative error times ``1/sqrt(hidden)`` of each column, which for 4-bit formats is a
sizeable share of what the edit removed. Every element of ``W'`` lies between two neighbours on its
grid; rounding it to the farther one instead moves ``c_j = u^T e_j`` (column ``j`` of ``E``) by
``u_i * (a_ij - q_ij)``. :func:`steer` makes a few greedy rounds: in each, every column flips one
element: of those that at least halve ``|c_j|`` the one that leaves the column's norm closest to
the float32 column's, else the one that brings ``|c_j|`` closest to zero; an element is flipped at
most once, and never so that the column's relative norm error exceeds the largest one plain rounding
left in the matrix (norm preservation survives quantization as well as without steering). Every element stays within one grid step of its float32 value, and the
scales are untouched.
"""

from __future__ import annotations

ROUNDS = 6


def steer(values, codes, scales, u, magnitudes, sign_bit: int, rounds: int = ROUNDS):
    """Re-round ``codes`` (``[hidden, n]``, the residual axis first) in place; returns them.

    ``values``: the float32 targets; ``scales``: the float32 scale of every element (same shape);
    ``u``: the unit edit vector ``[hidden]``; ``magnitudes``: float32 value of each magnitude code
    (increasing from 0); ``sign_bit``: the code's sign bit (E4M3 ``0x80``, E2M1 ``0x8``).
    """
    import numpy as np

    step = max(1, (1 << 18) // max(codes.shape[0], 1))  # columns are independent: bounded memory per slice
    for start in range(0, codes.shape[1], step):
        part = slice(start, start + step)
        codes[:, part] = _steer(values[:, part], codes[:, part], scales[:, part], u, magnitudes, sign_bit, rounds)
    return codes


def _steer(values, codes, scales, u, magnitudes, sign_bit: int, rounds: int):
    import numpy as np

    mask = sign_bit - 1
    mag = (codes & mask).astype(np.int64)
    sign = np.where(codes & sign_bit, -1.0, 1.0).astype(np.float32)
    q = sign * magnitudes[mag] * scales  # what de-quantization gives, float32
    target = np.abs(values)
    up = target > magnitudes[mag] * scales  # rounded towards zero: the other neighbour is one code up
    down = target < magnitudes[mag] * scales
    alt = np.where(up, mag + 1, np.where(down, mag - 1, mag))
    valid = (up | down) & (alt >= 0) & (alt < len(magnitudes))
    alt = np.clip(alt, 0, len(magnitudes) - 1)
    a = sign * magnitudes[alt] * scales
    u = np.asarray(u, dtype=np.float64)
    gain = np.where(valid, u[:, None] * (a.astype(np.float64) - q), 0.0)  # change of c_j per flip [hidden, n]
    q64, a64 = q.astype(np.float64), a.astype(np.float64)
    moved = np.where(valid, a64 * a64 - q64 * q64, 0.0)  # change of |column|^2 per flip
    c = u @ (q64 - values)  # [n]
    target_norm = np.sqrt(np.square(values.astype(np.float64)).sum(axis=0))  # [n]
    sq = (q64 * q64).sum(axis=0)  # |column|^2 as quantized now
    live = target_norm > 0
    worst = float((np.abs(np.sqrt(sq) - target_norm)[live] / target_norm[live]).max()) if live.any() else 0.0
    limit = np.maximum(np.abs(np.sqrt(sq) - target_norm), worst * target_norm) * (1 + 1e-9)  # relative drift cap
    cols = np.arange(codes.shape[1])
    for _ in range(rounds):
        norm_after = np.abs(np.sqrt(np.maximum(sq[None, :] + moved, 0.0)) - target_norm[None, :])
        allowed = valid & (norm_after <= limit[None, :])
        after = np.where(allowed, np.abs(c[None, :] + gain), np.inf)
        halves = after <= 0.5 * np.abs(c)[None, :]  # flips that at least halve |c_j|: the one best for the norm
        best = np.where(halves.any(axis=0), np.argmin(np.where(halves, norm_after, np.inf), axis=0),
                        np.argmin(after, axis=0))
        improves = after[best, cols] < np.abs(c) * (1 - 1e-9)
        if not improves.any():
            break
        rows, picked = best[improves], cols[improves]
        c[picked] += gain[rows, picked]
        sq[picked] += moved[rows, picked]
        mag[rows, picked] = alt[rows, picked]
        valid[rows, picked] = False
    return (mag | np.where(sign < 0, sign_bit, 0)).astype(np.uint8)
