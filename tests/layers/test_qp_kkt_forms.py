"""The interior point's two KKT orders: primal (Q + GᵀW⁻¹G) and dual (whitened, m × m)."""

import pytest
import torch

import implicit_layers as il
from implicit_layers.solvers.qp.problem import QPProblem
from implicit_layers.solvers.qp.views import PrimalView, WhitenedView, make_view
from implicit_layers.testing.qp_problems import strictly_complementary_qp
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)
from tests.layers.test_qp import cvxpy_solve

NAMES = ("Q", "c", "A", "b", "G", "h")


def _solve_and_grads(data, form, x_bar):
    args = [t.clone().requires_grad_() for t in data]
    layer = il.QPLayer(solver=il.InteriorPoint(kkt_form=form))
    x, lam, mu = layer(*args)
    (x * x_bar).sum().backward()
    return (x.detach(), lam.detach(), mu.detach()), [a.grad for a in args], layer.stats.forward


@pytest.mark.parametrize("n, m, p", [(8, 12, 0), (10, 12, 3), (12, 5, 4)])  # p + m/2 ≤ n: LICQ
def test_primal_and_dual_orders_agree_on_values_and_gradients(n, m, p):
    data, (xs, ls, ms) = strictly_complementary_qp(batch=(3,), n=n, m=m, p=p, seed=11)
    x_bar = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (x1, l1, m1), g1, st1 = _solve_and_grads(data, "primal", x_bar)
    (x2, l2, m2), g2, st2 = _solve_and_grads(data, "dual", x_bar)
    assert bool(st1.converged.all()) and bool(st2.converged.all())
    for a, b_, ref in ((x1, x2, xs), (l1, l2, ls), (m1, m2, ms)):
        torch.testing.assert_close(a, ref, atol=1e-8, rtol=0)
        torch.testing.assert_close(b_, ref, atol=1e-8, rtol=0)
    scale = max(float(g.abs().max()) for g in g1 if g.numel())
    for name, a, b_ in zip(NAMES, g1, g2, strict=True):
        assert a.numel() == 0 or float((a - b_).abs().max()) <= 1e-7 * scale, name


def _view(Q, c, A, b, G, h):
    P = QPProblem.from_data(Q, c, A, b, G, torch.full_like(h, -float("inf")), h)
    return make_view(P, whiten=True, reg=1e-9)


def test_auto_picks_the_dual_order_only_for_positive_definite_Q():
    (Q, c, A, b, G, h), _ = strictly_complementary_qp(batch=(2,), n=6, m=8, p=2, seed=3)
    assert isinstance(_view(Q, c, A, b, G, h), WhitenedView)
    singular = Q.clone()
    singular[1] = 0.0  # a linear program in the batch: the whole batch stays primal
    assert isinstance(_view(singular, c, A, b, G, h), PrimalView)
    dependent = A.clone()
    dependent[:, 1] = dependent[:, 0]  # A Q⁻¹ Aᵀ singular
    assert isinstance(_view(Q, c, dependent, b, G, h), PrimalView)
    assert isinstance(_view(_ill_conditioned(6, 1e8, 2), c, A, b, G, h), PrimalView)


def _ill_conditioned(n, cond, batch):
    """Symmetric positive definite ``(batch, n, n)`` with eigenvalues log-spaced in ``[1, cond]``."""
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    eig = torch.logspace(0, float(torch.log10(torch.tensor(cond))), n, dtype=torch.float64)
    return ((V * eig) @ V.T).expand(batch, n, n).clone()


@pytest.mark.parametrize("cond", [1e4, 1e6, 1e8])
def test_ill_conditioned_Q_is_solved_to_tolerance(cond):
    # the stopping test measures residuals relative to the terms they sum: with ‖r_d‖ relative
    # to ‖c‖ alone, round-off ε‖Q‖‖x‖ made tol = 1e-12 unreachable for cond(Q) ≳ 1e5
    (_, c, A, b, G, h), _ = strictly_complementary_qp(batch=(4,), n=12, m=16, p=3, seed=9)
    Q = _ill_conditioned(12, cond, 4)
    layer = il.QPLayer()
    x, lam, mu = layer(Q, c, A, b, G, h)
    assert bool(layer.stats.forward.converged.all())
    for i in range(4):
        xr, _, _ = cvxpy_solve(Q[i], c[i], A[i], b[i], G[i], h[i])
        assert float((x[i] - torch.from_numpy(xr)).abs().max()) <= 1e-6 * (1 + float(x[i].abs().max()))


def test_dual_order_falls_back_on_a_linear_program():
    n = 3
    G = torch.cat([torch.eye(n), -torch.eye(n)]).double()
    h = torch.ones(2 * n, dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    solver = il.InteriorPoint(kkt_form="dual")
    x, _, _ = il.QPLayer(solver=solver)(torch.zeros(n, n, dtype=torch.float64), c, None, None, G, h)
    torch.testing.assert_close(x, -torch.sign(c), atol=1e-7, rtol=0)


def test_whitened_stopping_test_holds_in_the_original_coordinates():
    (Q, c, A, b, G, h), _ = strictly_complementary_qp(batch=(4,), n=10, m=14, p=3, seed=5)
    Q = Q + torch.diag_embed(torch.linspace(0, 50, 10, dtype=torch.float64)).expand_as(Q)  # uneven scales
    tol = 1e-10
    x, lam, mu = il.QPLayer(solver=il.InteriorPoint(tol=tol, kkt_form="dual"))(Q, c, A, b, G, h)
    mv = lambda M, v: (M @ v[..., None]).squeeze(-1)  # noqa: E731
    r_d = mv(Q, x) + c + mv(A.mT, lam) + mv(G.mT, mu)
    assert bool((r_d.abs().amax(-1) / (1 + c.abs().amax(-1)) <= 10 * tol).all())


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_backward_and_jvp_reuse_the_forward_factorization(form, monkeypatch):
    data, _ = strictly_complementary_qp(batch=(2,), n=5, m=7, p=2, seed=6)
    calls = []
    original = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **k: calls.append(1) or original(*a, **k))
    args = [t.clone().requires_grad_() for t in data]
    layer = il.QPLayer(solver=il.InteriorPoint(kkt_form=form))
    x, _, _ = layer(*args)
    forward_calls = len(calls)
    assert forward_calls > 0
    grads = torch.autograd.grad(x.sum(), args, create_graph=True)  # backward
    sum(g.sum() for g in grads).backward()  # double backward
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(t, torch.ones_like(t)) for t in data]
        tangent = torch.autograd.forward_ad.unpack_dual(layer(*duals)[0]).tangent
    assert tangent is not None and bool(torch.isfinite(tangent).all())
    assert len(calls) == 2 * forward_calls  # the JVP's own forward solve; no derivative factors


def test_bad_kkt_form():
    with pytest.raises(ValueError, match="kkt_form"):
        il.InteriorPoint(kkt_form="schur")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("form", ["primal", "dual"])
def test_cuda_matches_cpu(form):
    data, (xs, _, _) = strictly_complementary_qp(batch=(4,), n=8, m=10, p=2, seed=8)
    x_bar = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (x_cpu, _, _), g_cpu, _ = _solve_and_grads(data, form, x_bar)
    (x_gpu, _, _), g_gpu, stats = _solve_and_grads([t.cuda() for t in data], form, x_bar.cuda())
    assert bool(stats.converged.all())
    torch.testing.assert_close(x_gpu.cpu(), x_cpu, atol=1e-9, rtol=0)
    for a, b_ in zip(g_cpu, g_gpu, strict=True):
        torch.testing.assert_close(b_.cpu(), a, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_qps_all_converge(dtype):
    # float32 used to stall on ~3% of these (the dual order's directions were capped at
    # s/μ ≥ 3e-4 and regularized by 7e-5); each sample of each batch must now be SOLVED
    for seed in range(4):
        for n, m, p in ((5, 6, 1), (10, 15, 3), (8, 20, 0)):
            (Q, c, A, b, G, h), _ = strictly_complementary_qp(batch=(8,), n=n, m=m, p=p, seed=seed)
            Q = Q * torch.logspace(0, 2, 8, dtype=Q.dtype)[:, None, None]
            layer = il.QPLayer(on_failure="warn")
            layer(*(t.to(dtype) for t in (Q, c, A, b, G, h)))
            assert bool(layer.stats.forward.converged.all()), (seed, n, m, p)


def test_empty_batch_gives_empty_outputs_and_gradients():
    data, _ = strictly_complementary_qp(batch=(3,), n=4, m=5, p=1, seed=0)
    args = [t[:0].clone().requires_grad_() for t in data]
    x, lam, mu = il.QPLayer()(*args)
    assert (x.shape, lam.shape, mu.shape) == ((0, 4), (0, 1), (0, 5))
    (x.sum() + lam.sum() + mu.sum()).backward()
    assert [a.grad.shape for a in args] == [a.shape for a in args]
