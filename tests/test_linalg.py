"""The edit math: what an edited weight computes, checked on random matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from abliterate.errors import UserError
from abliterate.linalg import (
    apply_columns, apply_rows, column_coefficients, column_stats, edit_columns_dense, fold_gain, layer_direction,
    orthogonalize, sparsify, unit,
)


def _unit(n: int, seed: int) -> torch.Tensor:
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm()


def _streamed_columns(w: torch.Tensor, us: list, scales: list, nps: list, chunk: int = 7) -> torch.Tensor:
    """Apply edits to W [hidden, in] the way ablate does: stats over row chunks, then apply (numpy)."""
    wn = w.numpy().copy()
    u = torch.stack(us, dim=1).numpy()  # [hidden, T] fp64
    uc = u.astype(wn.dtype)
    g = np.zeros((len(us), wn.shape[1]))
    n2 = np.zeros(wn.shape[1])
    for a in range(0, wn.shape[0], chunk):
        pg, pn = column_stats(wn[a:a + chunk], uc[a:a + chunk])
        g += pg
        n2 += pn
    b, f = column_coefficients(g, n2, u, scales, nps)
    b, f = b.astype(wn.dtype), f.astype(wn.dtype)
    parts = [apply_columns(wn[a:a + chunk].copy(), uc[a:a + chunk], b, f) for a in range(0, wn.shape[0], chunk)]
    return torch.from_numpy(np.concatenate(parts))


def _rows(x: torch.Tensor, u: torch.Tensor, scale: float, norm_preserve: bool) -> torch.Tensor:
    xn = x.numpy().copy()
    return torch.from_numpy(apply_rows(xn, u.numpy().astype(xn.dtype), scale, norm_preserve))


@pytest.mark.parametrize("norm_preserve", [True, False])
def test_scale_one_removes_the_direction_from_every_column(norm_preserve):
    w = torch.randn(64, 96, dtype=torch.float32)
    u = _unit(64, 1)
    out = _streamed_columns(w, [u], [1.0], [norm_preserve]).double()
    # what each input unit writes has no component along u
    assert (u @ out).abs().max() / out.norm(dim=0).min() < 1e-6
    norms, before = out.norm(dim=0), w.double().norm(dim=0)
    if norm_preserve:
        assert torch.allclose(norms, before, rtol=1e-6)
    else:
        assert (norms <= before + 1e-6).all() and (norms < before - 1e-4).any()


def test_scale_zero_is_the_identity_bit_for_bit():
    w = torch.randn(64, 40)
    u = _unit(64, 2)
    assert torch.equal(_streamed_columns(w, [u], [0.0], [True]), w)
    assert torch.equal(_rows(w.T.contiguous(), u, 0.0, True), w.T)


def test_negative_scale_adds_the_direction_back():
    w = torch.randn(64, 40, dtype=torch.float64)
    u = _unit(64, 3)
    plain = _streamed_columns(w, [u], [-1.0], [False])
    assert torch.allclose(u @ plain, 2 * (u @ w), atol=1e-10)  # plain: component doubles
    kept = _streamed_columns(w, [u], [-1.0], [True])
    grow = (u @ kept).abs() / kept.norm(dim=0)
    assert (torch.sign(u @ kept) == torch.sign(u @ w)).all()
    assert (grow > (u @ w).abs() / w.norm(dim=0)).all()  # larger share of r, same column norm
    assert torch.allclose(kept.norm(dim=0), w.norm(dim=0), rtol=1e-10)


def test_streamed_composition_matches_edits_applied_one_after_another():
    w = torch.randn(48, 30, dtype=torch.float64)
    us, scales, nps = [_unit(48, 4), _unit(48, 5), _unit(48, 6)], [1.0, 0.5, -0.7], [True, False, True]
    expected = w
    for u, s, np_ in zip(us, scales, nps):
        expected = edit_columns_dense(expected, u, s, np_)
    got = _streamed_columns(w, us, scales, nps, chunk=5)
    assert torch.allclose(got, expected, atol=1e-10)


def test_a_column_parallel_to_the_direction_is_guarded():
    u = _unit(16, 7)
    w = torch.randn(16, 4, dtype=torch.float64)
    w[:, 2] = 3.0 * u
    out = _streamed_columns(w, [u], [1.0], [True])
    assert torch.isfinite(out).all()
    assert out[:, 2].abs().max() < 1e-12  # nothing left to rescale: stays the plain projection
    assert torch.allclose(out[:, [0, 1, 3]].norm(dim=0), w[:, [0, 1, 3]].norm(dim=0))


@pytest.mark.parametrize("norm_preserve", [True, False])
def test_rows_edit_each_row_in_the_residual_space(norm_preserve):
    x = torch.randn(20, 64, dtype=torch.float32)
    u = _unit(64, 8)
    out = _rows(x, u, 1.0, norm_preserve).double()
    assert (out @ u).abs().max() / out.norm(dim=1).min() < 1e-6
    if norm_preserve:
        assert torch.allclose(out.norm(dim=1), x.double().norm(dim=1), rtol=1e-6)


def test_gain_folding_makes_the_normed_write_blind_to_r():
    """A writer followed by a norm with gain g: edit with u = normalize(g * r)."""
    r, g = _unit(64, 9), 0.3 + torch.rand(64, dtype=torch.float64) * 2
    w = torch.randn(64, 80, dtype=torch.float64)
    a = torch.randn(80, 10, dtype=torch.float64)

    def normed_write(weight):  # RMS norm with gain g after the writer
        y = weight @ a
        return g[:, None] * y / y.pow(2).mean(0, keepdim=True).sqrt()

    folded = edit_columns_dense(w, fold_gain(r, g), 1.0, True)
    naive = edit_columns_dense(w, r, 1.0, True)
    rel = lambda y: float(((r @ y).abs() / y.norm(dim=0)).max())  # noqa: E731
    assert rel(normed_write(folded)) < 1e-12
    assert rel(normed_write(naive)) > 1e-3  # projecting off r itself is not enough


def test_biprojection_is_orthogonal_to_both_harmless_means_jointly():
    r, a, b = _unit(64, 10), _unit(64, 11) + 0.5, _unit(64, 12) + 0.5  # a and b far from orthogonal
    out = layer_direction(r, [a, b])
    assert abs(float(out.norm()) - 1) < 1e-12
    assert abs(float(out @ a)) < 1e-12 and abs(float(out @ b)) < 1e-12
    # identical or collinear means (m == k + 1) are fine
    same = orthogonalize(r, [a, 2 * a])
    assert abs(float(same @ a)) < 1e-12


def test_sparsity_zeroes_the_smallest_fraction_of_components():
    r = _unit(64, 13)
    out = sparsify(r, 0.25)
    zeroed = (out == 0).nonzero().flatten()
    assert len(zeroed) == 16
    assert r.abs()[zeroed].max() <= r.abs()[out != 0].min()
    assert abs(float(out.norm()) - 1) < 1e-12
    assert torch.equal(sparsify(r, 0.0), r / r.norm())


def test_bad_directions_are_user_errors():
    with pytest.raises(UserError, match="zero"):
        unit(torch.zeros(8))
    with pytest.raises(UserError, match="NaN"):
        unit(torch.tensor([1.0, float("nan")]))
    with pytest.raises(UserError, match="span"):
        orthogonalize(_unit(8, 1), [_unit(8, 1)])
    with pytest.raises(UserError, match="sparsity"):
        sparsify(_unit(8, 1), 1.0)
