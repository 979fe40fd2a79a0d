"""Issue 14, item 1: two-sided constraints ``lower ≤ Gx ≤ h`` with signed multipliers.

Random problems with a known strictly complementary solution where rows are active on the
upper side (μ > 0), on the lower side (μ < 0), inactive, or have an infinite side; checked
against the construction and Clarabel, the KKT conditions ``Qx + c + Aᵀλ + Gᵀμ = 0`` with the
sign of μ telling the side, gradcheck and forward mode on every backend, absent bounds
(±inf, |bound| ≥ 1e20) equal to no row at all, the native form equal to the stacked
``[G; −G]`` one, and OSQP agreeing with the interior point.
"""

import pytest
import torch
from torch.autograd import gradcheck

import implicit_layers as il
from implicit_layers import functional as F
from implicit_layers.solvers.qp.problem import QPProblem
from tests.layers.qp_backends import BACKENDS, make
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)
from tests.layers.qp_references import clarabel_batch

f64 = dict(dtype=torch.float64)
INF = float("inf")


def two_sided_qp(B=4, n=6, m=8, p=1, seed=0):
    """``(Q, c, A, b, G, lower, upper), (x, λ, μ)``: row kinds cycle through upper-active,
    lower-active, inactive, upper-active with ``lower = −inf``, lower-active with
    ``upper = +inf``, inactive with both sides infinite."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(B, *s, generator=g, **f64)  # noqa: E731
    u = lambda *s: 0.5 + torch.rand(B, *s, generator=g, **f64)  # noqa: E731
    M = r(n, n)
    Q = M @ M.mT / n + 0.5 * torch.eye(n, **f64)
    A, G, x, lam = r(p, n), r(m, n), r(n), r(p)
    kind = torch.arange(m) % 6
    Gx = (G @ x[..., None])[..., 0]
    up_active, lo_active = (kind == 0) | (kind == 3), (kind == 1) | (kind == 4)
    mu = torch.where(up_active, u(m), torch.where(lo_active, -u(m), 0.0))
    upper = torch.where(lo_active | (kind == 2), Gx + u(m), Gx)
    lower = torch.where(up_active | (kind == 2), Gx - u(m), Gx)
    upper = torch.where((kind == 4) | (kind == 5), INF, upper)
    lower = torch.where((kind == 3) | (kind == 5), -INF, lower)
    b = (A @ x[..., None])[..., 0]
    c = -(Q @ x[..., None] + A.mT @ lam[..., None] + G.mT @ mu[..., None])[..., 0]
    return (Q, c, A, b, G, lower, upper), (x, lam, mu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_multipliers_match_the_construction_and_clarabel(backend):
    (Q, c, A, b, G, lower, upper), (xs, ls, ms) = two_sided_qp(B=6, n=12, m=12, p=2)
    x, lam, mu = make(backend)(Q, c, A, b, G, upper, lower=lower)
    torch.testing.assert_close(x, xs, atol=1e-8, rtol=0)
    torch.testing.assert_close(mu, ms, atol=1e-7, rtol=0)
    torch.testing.assert_close(lam, ls, atol=1e-7, rtol=0)
    xr, lr, mr, status = clarabel_batch(Q, c, A, b, G, lower, upper)
    assert all(s == "Solved" for s in status)
    torch.testing.assert_close(x, xr, atol=1e-7, rtol=0)
    torch.testing.assert_close(mu, mr, atol=1e-6, rtol=0)
    r_d = Q @ x[..., None] + c[..., None] + A.mT @ lam[..., None] + G.mT @ mu[..., None]
    assert float(r_d.abs().max()) <= 1e-9
    Gx = (G @ x[..., None])[..., 0]
    assert bool(((mu > 0) <= (Gx - upper).abs().le(1e-9)).all())   # μ > 0: upper side active
    assert bool(((mu < 0) <= (Gx - lower).abs().le(1e-9)).all())   # μ < 0: lower side active


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_forward_mode_with_both_sides_active(backend):
    (Q, c, A, b, G, lower, upper), _ = two_sided_qp(B=1, n=3, m=3, p=1, seed=1)
    # gradcheck perturbs every entry: keep the bounds finite (rows 0-2: upper, lower, inactive)
    args = [t.clone().requires_grad_() for t in (Q, c, A, b, G, upper, lower)]
    layer = make(backend)

    def f(*a):
        return layer(*a[:6], lower=a[6])

    assert gradcheck(f, args, atol=1e-6, rtol=1e-5, fast_mode=True)
    assert gradcheck(f, args, atol=1e-6, rtol=1e-5, check_forward_ad=True, fast_mode=True,
                     check_backward_ad=False, check_undefined_grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("absent", [INF, 1e20, 1e30])
def test_absent_bounds_equal_missing_rows(backend, absent):
    (Q, c, A, b, G, lower, upper), _ = two_sided_qp(B=3, n=10, m=12, p=1, seed=2)
    lower = torch.where(torch.isinf(lower), -absent, lower)
    upper = torch.where(torch.isinf(upper), absent, upper)
    layer = make(backend)
    args = [t.clone().requires_grad_() for t in (c, G, upper, lower)]
    x, _, mu = layer(Q, args[0], A, b, args[1], args[2], lower=args[3])
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), **f64)
    grads = torch.autograd.grad((x * w).sum() + mu.sum(), args)
    # rows 5 and 11 have no bound at all: drop them; the one-sided rows are one-sided
    keep = torch.tensor([k % 6 != 5 for k in range(12)])
    ref = [t.clone().requires_grad_() for t in (c, G[:, keep], upper[:, keep], lower[:, keep])]
    x2, _, mu2 = layer(Q, ref[0], A, b, ref[1], ref[2], lower=ref[3])
    ref_grads = torch.autograd.grad((x2 * w).sum() + mu2.sum(), ref)
    torch.testing.assert_close(x, x2, atol=1e-9, rtol=0)
    torch.testing.assert_close(mu[:, keep], mu2, atol=1e-9, rtol=0)
    assert float(mu.detach()[:, ~keep].abs().max()) == 0.0
    torch.testing.assert_close(grads[0], ref_grads[0], atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(grads[1][:, keep], ref_grads[1], atol=1e-8, rtol=1e-8)
    assert float(grads[1][:, ~keep].abs().max()) == 0.0
    for g, rg, bound in ((grads[2], ref_grads[2], upper), (grads[3], ref_grads[3], lower)):
        torch.testing.assert_close(g[:, keep], rg, atol=1e-8, rtol=1e-8)
        assert float(g[bound.abs() >= 1e20].abs().max()) == 0.0  # absent bounds get no gradient


def test_native_equals_stacked_form_and_backends_agree():
    (Q, c, A, b, G, lower, upper), _ = two_sided_qp(B=4, n=10, m=10, p=2, seed=3)
    lower, upper = lower.nan_to_num(neginf=-1e3), upper.nan_to_num(posinf=1e3)
    w = torch.randn(4, 10, generator=torch.Generator().manual_seed(1), **f64)
    results = []
    for backend in BACKENDS:
        args = [t.clone().requires_grad_() for t in (Q, c, A, b, G, upper, lower)]
        x, _, _ = make(backend)(*args[:6], lower=args[6])
        results.append((x.detach(), torch.autograd.grad((x * w).sum(), args)))
    args = [t.clone().requires_grad_() for t in (Q, c, A, b, G, upper, lower)]
    Gs, hs = torch.cat([args[4], -args[4]], -2), torch.cat([args[5], -args[6]], -1)
    x, _, mu_stacked = F.qp(args[0], args[1], args[2], args[3], Gs, hs)
    results.append((x.detach(), torch.autograd.grad((x * w).sum(), args)))
    x0, g0 = results[0]
    for x1, g1 in results[1:]:
        torch.testing.assert_close(x1, x0, atol=1e-8, rtol=0)
        for a, b_ in zip(g1, g0, strict=True):
            torch.testing.assert_close(a, b_, atol=1e-7, rtol=1e-6)
    _, _, mu = il.QPLayer()(Q, c, A, b, G, upper, lower=lower)
    torch.testing.assert_close(mu, mu_stacked[:, :10] - mu_stacked[:, 10:], atol=1e-8, rtol=0)


@pytest.mark.parametrize("far", [1e3, 1e6])
@pytest.mark.parametrize("kkt_form", ["primal", "dual"])
def test_far_finite_bounds_are_solved_like_absent_ones(far, kkt_form):
    """Bounds of ±1e3 or ±1e6 standing in for "no bound": the interior point once jammed on
    them (its first iterate's gap is huge; 26 of 192 and 96 of 192 samples of this sweep
    ended MAX_ITER). The solution is the one with those bounds absent (none is active)."""
    solver = il.InteriorPoint(kkt_form=kkt_form)
    for seed in range(4):
        (Q, c, A, b, G, lower, upper), (x_true, _, _) = two_sided_qp(B=4, n=12, m=12, p=2, seed=seed)
        lo, up = lower.nan_to_num(neginf=-far), upper.nan_to_num(posinf=far)
        sol = solver.solve(QPProblem.from_data(Q, c, A, b, G, lo, up))
        assert bool((sol.status == il.QPStatus.SOLVED).all()), (seed, sol.status)
        torch.testing.assert_close(sol.x, x_true, atol=1e-8, rtol=0)
