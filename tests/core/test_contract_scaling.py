"""Observations 8–9 of issue 13 (scale): problems whose data are scaled by 1e8 or 1e-8 (and,
for Lyapunov, by 1e±200) have representable solutions, and the layers return them, never a
SingularSystemError. Each solution is compared with the unscaled problem's, transformed by
the known scaling law."""

import pytest
import torch

import implicit_layers as il
from implicit_layers import functional as F
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)

DT = torch.float64
SCALES = [1e8, 1e-8]


def _data():
    g = torch.Generator().manual_seed(0)
    L = torch.randn(4, 4, generator=g, dtype=DT)
    Q = L @ L.T + torch.eye(4, dtype=DT)
    c, A, b = (torch.randn(*s, generator=g, dtype=DT) for s in ((4,), (2, 4), (2,)))
    G, h = torch.randn(3, 4, generator=g, dtype=DT), torch.rand(3, generator=g, dtype=DT)
    return Q, c, A, b, G, h


@pytest.mark.parametrize("s", SCALES)
def test_equality_qp_is_scale_invariant(s):
    """x* is unchanged when (Q, c) or (A, b) is multiplied by s; λ* scales by s resp. 1/s."""
    Q, c, A, b, _, _ = _data()
    x, lam = F.eq_qp(Q, c, A, b)
    for (Qs, cs, As, bs), lam_scale in (((Q * s, c * s, A, b), s), ((Q, c, A * s, b * s), 1 / s),
                                        ((Q * s, c * s, A * s, b * s), 1.0)):
        xs, lams = F.eq_qp(Qs, cs, As, bs)
        torch.testing.assert_close(xs, x, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(lams / lam_scale, lam, atol=1e-9, rtol=1e-7)


QP_CASES = [pytest.param(solver, s, id=f"{solver.__name__}-{s:g}")
            for solver in (il.InteriorPoint, il.OSQP) for s in SCALES]


@pytest.mark.parametrize("solver, s", QP_CASES)
def test_inequality_qp_is_invariant_to_the_cost_scale(solver, s):
    """x* is unchanged when (Q, c) is multiplied by s (for s = 1e-8 the interior point kept a
    cost scale of 1e-4, OSQP ran on the raw data with absolute tolerances: both returned points
    4-7 % off as solved)."""
    Q, c, A, b, G, h = _data()
    x = F.qp(Q, c, A, b, G, h, solver=solver())[0]
    torch.testing.assert_close(F.qp(Q * s, c * s, A, b, G, h, solver=solver())[0], x,
                               atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("solver, s", QP_CASES)
def test_inequality_qp_is_invariant_to_the_constraint_scale(solver, s):
    Q, c, A, b, G, h = _data()
    x = F.qp(Q, c, A, b, G, h, solver=solver())[0]
    torch.testing.assert_close(F.qp(Q, c, A * s, b * s, G * s, h * s, solver=solver())[0], x,
                               atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", ["schur", "eig"])
@pytest.mark.parametrize("s", SCALES + [1e200, 1e-300])
def test_lyapunov_of_scaled_data(s, backend):
    """A P + P Aᵀ + Q = 0 with A = diag(−1, −2)·s: P = diag(½, ¼)/s, representable for every s
    here (|λ|² overflowed in the singularity check at 1e200 and underflowed at 1e-300)."""
    A = torch.diag(torch.tensor([-1.0, -2.0], dtype=DT)) * s
    P = F.lyapunov(A, torch.eye(2, dtype=DT), backend=backend)
    torch.testing.assert_close(P * s, torch.diag(torch.tensor([0.5, 0.25], dtype=DT)),
                               atol=1e-15, rtol=1e-12)
    if abs(torch.log10(torch.tensor(s))) < 100:  # Q scaled: P scales with it
        Ps = F.lyapunov(A / s, torch.eye(2, dtype=DT) * s, backend=backend)
        torch.testing.assert_close(Ps / s, torch.diag(torch.tensor([0.5, 0.25], dtype=DT)))


@pytest.mark.parametrize("s", SCALES)
def test_newton_on_a_scaled_residual(s):
    """s·(M y − x) and s·(y³ + y − x): the roots do not depend on s (the tolerances are on
    the residual, ``‖f‖ ≤ tol + rtol ‖y‖``, so they scale with s)."""
    Q, _, A, _, _, _ = _data()
    M, x = Q[:2, :2], torch.ones(2, dtype=DT)
    y = F.root_find(lambda x, y: s * (y @ M.T - x), x, torch.zeros(2, dtype=DT),
                    solver=il.Newton(tol=1e-12 * s, rtol=1e-12 * s))
    torch.testing.assert_close(y, torch.linalg.solve(M, x), atol=1e-10, rtol=0)
    y = F.root_find(lambda x, y: s * (y ** 3 + y - x), x, torch.zeros(2, dtype=DT),
                    solver=il.Newton(tol=1e-12 * s, rtol=1e-12 * s))
    torch.testing.assert_close(y ** 3 + y, x, atol=1e-10, rtol=0)
    (g,) = torch.autograd.grad(F.root_find(lambda x, y: s * (y ** 3 + y - x), x.requires_grad_(),
                                           torch.zeros(2, dtype=DT),
                                           solver=il.Newton(tol=1e-12 * s, rtol=1e-12 * s)).sum(), x)
    torch.testing.assert_close(g, 1 / (3 * y.detach() ** 2 + 1), atol=1e-10, rtol=0)
