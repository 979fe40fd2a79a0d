"""Per-sample failures of QPLayer: detected, reported, raised or warned, never poisoning the batch."""

import pytest
import torch

import implicit_layers as il
from implicit_layers import functional as F
from implicit_layers.testing.qp_problems import strictly_complementary_qp
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)


def batch_with_bad_samples(n=3):
    """Sample 0 is fine, sample 1 infeasible (x₀ ≤ −1 and x₀ ≥ 1), sample 2 an unbounded LP."""
    (Q, c, A, b, G, h), (xs, _, _) = strictly_complementary_qp(batch=(3,), n=n, m=2, p=0, seed=11)
    G, h, Q, c = G.clone(), h.clone(), Q.clone(), c.clone()
    G[1] = 0
    G[1, 0, 0], G[1, 1, 0] = 1.0, -1.0
    h[1] = -1.0
    Q[2], c[2], G[2], h[2] = 0.0, -1.0, -torch.eye(2, n, dtype=Q.dtype), 0.0  # min −Σx, x ≥ 0
    return (Q, c, G, h), xs


def test_status_per_sample_and_raise():
    (Q, c, G, h), _ = batch_with_bad_samples()
    layer = il.QPLayer()
    with pytest.raises(il.ConvergenceError, match="1 infeasible.*1 unbounded") as err:
        layer(Q, c, None, None, G, h)
    status = err.value.stats.extra["status"]
    assert status.tolist() == [il.QPStatus.SOLVED, il.QPStatus.INFEASIBLE, il.QPStatus.UNBOUNDED]


def test_warn_keeps_good_samples_and_gives_zero_finite_gradients_to_bad_ones():
    (Q, c, G, h), xs = batch_with_bad_samples()
    args = [t.clone().requires_grad_() for t in (Q, c, G, h)]
    layer = il.QPLayer(on_failure="warn")
    with pytest.warns(il.ConvergenceWarning, match="infeasible"):
        x, lam, mu = layer(args[0], args[1], None, None, args[2], args[3])
    assert bool(torch.isfinite(x).all() & torch.isfinite(mu).all())
    torch.testing.assert_close(x[0], xs[0], atol=1e-7, rtol=0)
    (x.sum() + mu.sum()).backward()
    for t in args:
        assert bool(torch.isfinite(t.grad).all())
        assert float(t.grad[1:].abs().max()) == 0.0
        assert float(t.grad[0].abs().max()) > 0.0 or t is args[3]
    # the good sample's gradient is the one it gets alone
    alone = [t[0].detach().clone().requires_grad_() for t in (Q, c, G, h)]
    xa, _, mua = F.qp(alone[0], alone[1], None, None, alone[2], alone[3])
    (xa.sum() + mua.sum()).backward()
    for t, a in zip(args, alone, strict=True):
        torch.testing.assert_close(t.grad[0], a.grad)


def test_max_iter_status():
    (Q, c, A, b, G, h), _ = strictly_complementary_qp(batch=(2,), seed=12)
    layer = il.QPLayer(solver=il.InteriorPoint(max_iter=1, polish=False), on_failure="warn")
    with pytest.warns(il.ConvergenceWarning, match="2 not solved to tolerance within max_iter"):
        layer(Q, c, A, b, G, h)
    assert layer.stats.forward.extra["status"].tolist() == [il.QPStatus.MAX_ITER] * 2


def test_numerical_failure_is_reported():
    # a rank-deficient equality block: the Schur complement is singular
    (Q, c, A, b, G, h), _ = strictly_complementary_qp(batch=(1,), p=2, seed=13)
    A = torch.cat([A[:, :1], A[:, :1]], 1)
    b = torch.cat([b[:, :1], b[:, :1] + 1.0], 1)  # inconsistent too
    layer = il.QPLayer(on_failure="warn")
    with pytest.warns(il.ConvergenceWarning):
        layer(Q, c, A, b, G, h)
    assert layer.stats.forward.extra["status"].item() != il.QPStatus.SOLVED


def test_degenerate_weakly_active_constraint_has_finite_gradient():
    # min ½‖x‖² − 2x₁ s.t. x₁ ≤ 1, x₂ ≤ 0: both constraints hold with equality; the second
    # has μ₂ = 0 (weakly active). The gradient is finite and between the one-sided derivatives.
    # (Degenerate problems converge to about √tol.)
    Q = torch.eye(2, dtype=torch.float64)
    c = torch.tensor([-2.0, 0.0], dtype=torch.float64)
    G = torch.eye(2, dtype=torch.float64)
    h = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    x, _, mu = F.qp(Q, c, None, None, G, h)
    torch.testing.assert_close(x, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(mu, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-4, rtol=0)
    (g,) = torch.autograd.grad(x[1], h)
    assert bool(torch.isfinite(g).all())
    assert -1e-6 <= float(g[1]) <= 1 + 1e-6  # dx₂/dh₂ is 1 from below, 0 from above
    assert abs(float(g[0])) < 1e-6
