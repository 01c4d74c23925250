"""Directions and projections: the edit math (docs/architecture.md), in pieces that work on streamed chunks.

Notation: ``r`` / ``u`` are unit vectors of the residual space (size ``hidden``), ``s`` the scale.

*Directions* are handled in fp64: :func:`layer_direction` turns the measured unit direction into
the one removed from a target layer (biprojection by a joint QR against harmless means, then
magnitude sparsification), :func:`fold_gain` makes it blind to a norm gain that sits between a
weight and the residual (``u = normalize(g * r)``).

*Edits* come in two layouts, both applied in fp32 (fp64 for fp64 tensors) on numpy chunks, so the
ablate stage never imports torch (its start-up would cost more than editing a shard):

* ``columns``: a 2-D writer ``W [hidden, in]`` (``o_proj``, ``down_proj``): every column ``w_j``
  is what input unit ``j`` writes into the residual. The plain edit is ``W' = W - s u (u^T W)``;
  the norm-preserving edit is ``W' = P W diag(|w_j| / |P w_j|)`` with ``P = I - s u u^T``.
  The column statistics ``c = u^T W`` and ``|w_j|^2`` are summed over row chunks first
  (:func:`column_stats`), so a tensor never has to be in memory whole; several edits of one
  tensor compose exactly into ``W' = W diag(F) + U B`` (:func:`column_coefficients`).
* ``rows``: a tensor whose *last* axis is the residual: fused experts ``[E, in, hidden]``,
  routers ``[E, hidden]`` (readers), embeddings ``[vocab, hidden]``, biases ``[hidden]`` or
  ``[E, hidden]``. Each row ``x`` becomes ``x - s (x.u) u`` (rescaled to ``|x|`` when
  norm-preserving); rows are independent, so any chunk of rows is edited on its own.

Biases always take the plain edit ``b' = b - s (b.u) u``: they have no input unit to keep.
A column or row that is (almost) parallel to ``u`` cannot be rescaled back to its norm at
``s = 1``; such a column (``|P w| <= GUARD |w|``) keeps its plain projection.
"""

from __future__ import annotations

import math

from abliterate.errors import fail

GUARD = 1e-6  # |P w| / |w| below this: the column is (anti)parallel to u, no norm restoration
QR_RANK_TOL = 1e-8  # a harmless mean within this relative distance of the others adds no constraint


def unit(vector, what: str = "direction"):
    """``vector / |vector|`` in fp64; fail if it is zero or not finite."""
    import torch

    v = vector.detach().to(torch.float64).flatten()
    if not bool(torch.isfinite(v).all()):
        fail(f"the {what} contains NaN or infinite values; rerun `dvc repro reduce` (check the activations)")
    norm = float(torch.linalg.vector_norm(v))
    if norm == 0.0 or not math.isfinite(norm):
        fail(f"the {what} is zero; the harmful and harmless means are identical there, pick another index")
    return v / norm


def project_out(r, against: list):
    """``r`` (fp64) minus its component in the span of ``against``; not renormalized.

    The span is found with one QR of the unit vectors ``[a_1 .. a_n]`` (``[hidden, n]``); columns
    whose diagonal of R is negligible (a repeated or collinear vector) are dropped, so ``m == k + 1``
    is fine. The projection is applied twice (two-pass Gram-Schmidt) for numerical hygiene.
    """
    import torch

    out = r.to(torch.float64)
    cols = [unit(a, "harmless mean") for a in against]
    if not cols:
        return out
    basis = torch.stack(cols, dim=1)  # [hidden, n]
    q, rr = torch.linalg.qr(basis, mode="reduced")  # q [hidden, n], rr [n, n]
    diag = rr.diagonal().abs()
    keep = diag > QR_RANK_TOL * float(diag.max())
    q = q[:, keep]  # [hidden, rank]
    for _ in range(2):
        out = out - q @ (q.T @ out)
    return out


def orthogonalize(r, against: list, what: str = "direction"):
    """Unit ``r`` with its component in the span of ``against`` removed (:func:`project_out`), renormalized."""
    import torch

    if not against:
        return unit(r, what)
    out = project_out(r, against)
    if float(torch.linalg.vector_norm(out)) < 1e-6:
        fail(f"the {what} lies in the span of the harmless means it is projected against; "
             "set ablate.projected to false or pick another measurement")
    return unit(out, what)


def sparsify(r, fraction: float):
    """Zero the ``floor(fraction * hidden)`` smallest-magnitude components of ``r``, renormalize.

    ``fraction = 0`` keeps every component (the name says what is removed; llm-abliteration's
    ``sparsity`` keeps that fraction instead). Ties are broken by index, so the result is stable.
    """
    import torch

    if not 0.0 <= fraction < 1.0:
        fail(f"sparsity must be in [0, 1), got {fraction}")
    n = r.numel()
    drop = int(math.floor(fraction * n))
    if drop == 0:
        return unit(r)
    drop = min(drop, n - 1)
    order = torch.argsort(r.abs(), stable=True)  # ascending |r_i|, ties by index
    out = r.to(torch.float64).clone()
    out[order[:drop]] = 0.0
    return unit(out, "sparsified direction")


def layer_direction(unit_m, harmless: list, sparsity: float = 0.0):
    """The unit direction removed from one target layer: projected against ``harmless``, sparsified.

    ``unit_m``: the measured unit direction at measurement index ``m`` (``[hidden]``);
    ``harmless``: the harmless means to be orthogonal to (biprojection: index ``m`` and ``k + 1``;
    empty list = no projection).
    """
    r = unit(unit_m)
    if harmless:
        r = orthogonalize(r, harmless)
    return sparsify(r, sparsity)


def fold_gain(r, gain):
    """``normalize(gain * r)``: the vector to edit with when a norm gain ``gain`` sits in between.

    A writer followed by a norm with per-channel gain ``g`` writes ``g * (W a) / rms``; making
    ``u^T W = 0`` with ``u = normalize(g * r)`` makes ``r . (g * W a) = 0``. A reader behind a norm
    sees ``g * x``; making ``W u = 0`` makes its output blind to ``x``'s component along ``r``.
    """
    import torch

    if gain is None:
        return unit(r)
    return unit(r.to(torch.float64) * gain.to(torch.float64), "gain-folded direction")


# --- column edits (2-D writers [hidden, in]), streamed over row chunks (numpy) ------------------


def column_stats(chunk, u_chunk, scratch=None):
    """Partial sums over one row chunk: ``G = U^T W`` (``[T, in]``) and ``|w_j|^2`` (``[in]``), fp64.

    ``chunk``: rows ``[rows, in]`` of ``W`` (compute dtype); ``u_chunk``: the same rows of the
    edit vectors, ``[rows, T]`` (compute dtype); ``scratch``: an optional buffer of at least the
    chunk's size. numpy arrays. A chunk holds few rows, so its sums in the compute dtype lose
    nothing that matters; the running totals over chunks are fp64.
    """
    import numpy as np

    g = (u_chunk.T @ chunk).astype(np.float64)  # [T, in]
    square = np.multiply(chunk, chunk, out=None if scratch is None else scratch.reshape(-1)[: chunk.size]
                         .reshape(chunk.shape))
    n2 = square.sum(axis=0).astype(np.float64)  # [in]
    return g, n2


def column_coefficients(g, n2, u, scales: list[float], norm_preserve: list[bool]):
    """Compose the edits of one tensor into ``W' = W diag(F) + U B``; returns ``(B, F)`` (fp64).

    ``g = U^T W`` (``[T, in]``) and ``n2 = |w_j|^2`` (``[in]``) from :func:`column_stats`;
    ``u``: ``[hidden, T]`` unit edit vectors (fp64), applied in order with ``scales[t]``.
    Edit ``t`` sees the current columns ``w`` with ``c = u_t^T w``; plain: ``w - s c u_t``;
    norm-preserving: the same times ``|w| / |w - s c u_t|``, where
    ``|w - s c u|^2 = |w|^2 - (2 s - s^2) c^2`` because ``|u| = 1``. Tracking
    ``W_t = (W + U A^T) diag(F)`` through the edits gives ``B = (A diag(F))^T`` rows.
    """
    import numpy as np

    t_count, cols = g.shape
    gram = u.T @ u  # [T, T]
    a = np.zeros((t_count, cols))  # [T, in]
    f_total = np.ones(cols)  # [in]
    cur = n2.copy()  # |w_j|^2 of the current columns
    for t in range(t_count):
        s = float(scales[t])
        c = f_total * (g[t] + gram[t, :t] @ a[:t])  # [in]: u_t^T W_{t-1}
        pn2 = np.maximum(cur - (2.0 * s - s * s) * c * c, 0.0)
        f = np.ones(cols)
        if norm_preserve[t]:
            ok = (pn2 > (GUARD * GUARD) * cur) & (cur > 0)
            f[ok] = np.sqrt(cur[ok] / pn2[ok])
            cur = np.where(ok, cur, pn2)
        else:
            cur = pn2
        a[t] = -s * c / np.where(f_total > 0, f_total, 1.0)
        f_total = f_total * f
    return a * f_total, f_total


def apply_columns(chunk, u_chunk, b, f, scratch=None):
    """One row chunk of ``W diag(F) + U B``, in place on ``chunk`` (``[rows, in]``); returns it.

    ``scratch``: an optional buffer of at least the chunk's size (no allocation per chunk).
    """
    import numpy as np

    chunk *= f
    tmp = np.empty_like(chunk) if scratch is None else scratch.reshape(-1)[: chunk.size].reshape(chunk.shape)
    for t in range(b.shape[0]):  # rank-one updates: a broadcast product is much faster than matmul here
        np.multiply(u_chunk[:, t : t + 1], b[t], out=tmp)
        chunk += tmp
    return chunk


# --- row edits (residual = last axis), each chunk on its own (numpy) ------------------------------


def apply_rows(chunk, u, scale: float, norm_preserve: bool):
    """Edit every row ``x`` of ``chunk [rows, hidden]``: ``x - s (x.u) u``, optionally back to ``|x|``.

    In place on ``chunk``; ``u`` in the chunk's dtype. Returns the chunk.
    """
    import numpy as np

    d = chunk @ u  # [rows]
    if norm_preserve:
        n2 = np.einsum("ij,ij->i", chunk, chunk, dtype=np.float64)  # [rows]
        pn2 = np.maximum(n2 - (2.0 * scale - scale * scale) * d.astype(np.float64) ** 2, 0.0)
        ok = (pn2 > (GUARD * GUARD) * n2) & (n2 > 0)
        f = np.ones_like(n2)
        f[ok] = np.sqrt(n2[ok] / pn2[ok])
        f = f.astype(chunk.dtype)
        chunk -= np.outer(scale * d, u)
        chunk *= f[:, None]
    else:
        chunk -= np.outer(scale * d, u)
    return chunk


# --- dense references (tests, verify) ------------------------------------------------------------


def edit_columns_dense(w, u, scale: float, norm_preserve: bool):
    """The column edit of a whole 2-D ``W [hidden, in]`` at once (fp64); a reference for tests."""
    import torch

    w64 = w.to(torch.float64)
    u64 = u.to(torch.float64)
    pw = w64 - scale * torch.outer(u64, u64 @ w64)
    if not norm_preserve:
        return pw
    n = torch.linalg.vector_norm(w64, dim=0)
    pn = torch.linalg.vector_norm(pw, dim=0)
    ok = (pn > GUARD * n) & (n > 0)
    return pw * torch.where(ok, n / torch.where(ok, pn, torch.ones_like(pn)), torch.ones_like(n))
