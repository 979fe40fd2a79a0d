"""Issue 12, observation 4: the problems cvxpy generates, through ``QPLayer.from_cvxpy``.

``min sum_squares(x − p) s.t. x ≥ 0, sum(x) ≤ 1`` is canonicalized by cvxpy into a QP with a
singular Q and equality constraints. Its solution is the Euclidean projection of p onto
{x ≥ 0, Σx ≤ 1} (closed form), with the Jacobian ``diag(1_S) − 1_S 1_Sᵀ/|S|`` on the support S
when the sum constraint is active and ``diag(1_{p > 0})`` otherwise. A bound of 1e30 means
"no bound".
"""

import cvxpy as cp
import numpy as np
import pytest
import torch

import implicit_layers as il
from tests.layers.qp_backends import BACKENDS
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)
from tests.layers.qp_references import simplex_projection

SAMPLES = 200


def projection_jacobian(p: np.ndarray) -> np.ndarray:
    x = simplex_projection(p)
    support = (x > 0).astype(float)
    if x.sum() < 1 - 1e-12:
        return np.diag(support)
    return np.diag(support) - np.outer(support, support) / support.sum()


def family(n: int, with_upper: bool = False):
    x, p = cp.Variable(n), cp.Parameter(n)
    cons = [x >= 0, cp.sum(x) <= 1]
    params = [p]
    if with_upper:
        u = cp.Parameter(n)
        cons.append(x <= u)
        params.append(u)
    return cp.Problem(cp.Minimize(cp.sum_squares(x - p)), cons), params, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 5])
def test_projection_family_all_solved_exact_values_and_derivatives(backend, n):
    prob, params, x = family(n)
    layer = il.QPLayer.from_cvxpy(prob, params, [x], solver=BACKENDS[backend](), on_failure="warn")
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(SAMPLES, n, generator=gen, dtype=torch.float64).requires_grad_()
    (xs,) = layer(p)
    status = layer.layer.stats.forward.extra["status"]
    assert int((status != il.QPStatus.SOLVED).sum()) == 0
    ref = torch.as_tensor(np.stack([simplex_projection(q) for q in p.detach().numpy()]))
    torch.testing.assert_close(xs.detach(), ref, atol=1e-7, rtol=0)
    J = torch.as_tensor(np.stack([projection_jacobian(q) for q in p.detach().numpy()]))
    w = torch.randn(SAMPLES, n, generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad((xs * w).sum(), p)
    torch.testing.assert_close(g, (J.mT @ w.unsqueeze(-1)).squeeze(-1), atol=1e-7, rtol=0)
    dp = torch.randn(SAMPLES, n, generator=gen, dtype=torch.float64)
    _, xdot = torch.func.jvp(lambda q: layer(q)[0], (p.detach(),), (dp,))
    torch.testing.assert_close(xdot, (J @ dp.unsqueeze(-1)).squeeze(-1), atol=1e-7, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bound_of_1e30_means_no_bound(backend):
    n = 5
    prob, params, x = family(n, with_upper=True)
    layer = il.QPLayer.from_cvxpy(prob, params, [x], solver=BACKENDS[backend]())
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(50, n, generator=gen, dtype=torch.float64).requires_grad_()
    u = torch.full((50, n), 1e30, dtype=torch.float64).requires_grad_()
    (xs,) = layer(p, u)
    assert bool((layer.layer.stats.forward.extra["status"] == il.QPStatus.SOLVED).all())
    ref = torch.as_tensor(np.stack([simplex_projection(q) for q in p.detach().numpy()]))
    torch.testing.assert_close(xs.detach(), ref, atol=1e-7, rtol=0)
    gp, gu = torch.autograd.grad(xs.sum(), (p, u))
    assert float(gu.abs().max()) == 0.0  # an absent bound receives no gradient
    assert bool(torch.isfinite(gp).all()) and float(gp.abs().max()) > 0
    # the same bound given directly to the layer, next to an infinite one
    Q, c = torch.eye(n, dtype=torch.float64), -p.detach()[:4]
    G = torch.cat([-torch.eye(n), torch.ones(1, n), torch.eye(n)]).double()
    for big in (1e30, float("inf")):
        h = torch.cat([torch.zeros(n), torch.ones(1), torch.full((n,), big)]).double()
        xd, _, mu = il.QPLayer(solver=BACKENDS[backend]())(Q, c, None, None, G, h)
        torch.testing.assert_close(xd, ref[:4], atol=1e-7, rtol=0)
        assert float(mu[:, n + 1:].abs().max()) == 0.0
