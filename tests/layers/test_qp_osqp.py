"""QPLayer with the OSQP backend: agrees with the interior point in values and gradients."""

import pytest
import torch
from torch.autograd import gradcheck

import implicit_layers as il
from implicit_layers.testing.qp_problems import strictly_complementary_qp
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)


def test_osqp_agrees_with_interior_point_values_and_gradients():
    (Q, c, A, b, G, h), (xs, _, ms) = strictly_complementary_qp(batch=(3,), n=6, m=8, p=2, seed=21)
    grads = []
    for solver in (il.InteriorPoint(), il.OSQP()):
        args = [t.clone().requires_grad_() for t in (Q, c, A, b, G, h)]
        x, lam, mu = il.QPLayer(solver=solver)(*args)
        torch.testing.assert_close(x, xs, atol=1e-7, rtol=0)
        torch.testing.assert_close(mu, ms, atol=1e-6, rtol=0)
        w = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        ((x * w).sum() + lam.sum() + mu.sum()).backward()
        grads.append([t.grad for t in args])
        layer = il.QPLayer(solver=solver)
        fwd = torch.func.jvp(lambda h_, layer=layer: layer(Q, c, A, b, G, h_)[0], (h,), (h,))[1]
        grads[-1].append(fwd)
    for g_ipm, g_osqp in zip(*grads, strict=True):
        torch.testing.assert_close(g_osqp, g_ipm, atol=1e-6, rtol=1e-6)


def test_osqp_gradcheck():
    (Q, c, A, b, G, h), _ = strictly_complementary_qp(batch=(1,), n=3, m=4, p=1, seed=22)
    args = [t.clone().requires_grad_() for t in (Q, c, A, b, G, h)]
    layer = il.QPLayer(solver=il.OSQP())
    assert gradcheck(lambda *a: layer(*a), args, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_osqp_reports_infeasible_and_unbounded():
    Q = torch.zeros(2, 1, 1, dtype=torch.float64)
    Q[0] = 1.0
    c = torch.tensor([[0.0], [-1.0]], dtype=torch.float64)
    G = torch.tensor([[[1.0], [-1.0]], [[-1.0], [0.0]]], dtype=torch.float64)
    h = torch.tensor([[-1.0, -1.0], [0.0, 1.0]], dtype=torch.float64)
    layer = il.QPLayer(solver=il.OSQP(), on_failure="warn")
    with pytest.warns(il.ConvergenceWarning):
        x, _, _ = layer(Q, c, None, None, G, h)
    assert layer.stats.forward.extra["status"].tolist() == [il.QPStatus.INFEASIBLE, il.QPStatus.UNBOUNDED]
    assert bool(torch.isfinite(x).all())
