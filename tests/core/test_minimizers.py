"""The minimizers' pieces: the strong Wolfe line search, CG with curvature detection, L-BFGS,
Newton-CG, the SciPy wrapper and the least-squares solvers, on problems with known minima."""

import pytest
import torch

import implicit_layers as il
from implicit_layers.solvers.minimize.cg import conjugate_gradient
from implicit_layers.solvers.minimize.line_search import strong_wolfe
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)

D64 = torch.float64


def _softplus_bowl(A, b):
    """f(y) = Σ softplus(A y − b) + ½‖y‖², strictly convex, batched over A's leading dim."""
    def f(y):
        z = (A @ y.unsqueeze(-1)).squeeze(-1) - b
        return torch.nn.functional.softplus(z).sum(-1) + 0.5 * y.square().sum(-1)

    def value_and_grad(y):
        y = y.detach().requires_grad_()
        with torch.enable_grad():
            v = f(y)
            (g,) = torch.autograd.grad(v.sum(), y)
        return v.detach(), g

    return value_and_grad


@pytest.mark.parametrize("alpha0", [1e-3, 1.0, 50.0])
def test_line_search_steps_satisfy_the_strong_wolfe_conditions(alpha0):
    gen = torch.Generator().manual_seed(0)
    A, b = torch.randn(6, 5, 4, generator=gen, dtype=D64), torch.randn(6, 5, generator=gen, dtype=D64)
    evaluate = _softplus_bowl(3 * A, b)
    y = torch.randn(6, 4, generator=gen, dtype=D64)
    f0, g0 = evaluate(y)
    d = -g0 + 0.3 * torch.randn(6, 4, generator=gen, dtype=D64)
    d = torch.where(((g0 * d).sum(-1) < 0)[:, None], d, -g0)
    active = torch.tensor([True, True, True, False, True, True])
    c1, c2 = 1e-4, 0.5
    res = strong_wolfe(evaluate, y, f0, g0, d, torch.full((6,), alpha0, dtype=D64), active, c1, c2)
    assert bool(res.wolfe[active].all()) and res.alpha[3] == 0 and not res.decrease[3]
    f, g = evaluate(y + res.alpha[:, None] * d)
    dg0, dg = (g0 * d).sum(-1), (g * d).sum(-1)
    assert bool((f[active] <= f0[active] + c1 * res.alpha[active] * dg0[active] + 1e-12).all())
    assert bool((dg.abs()[active] <= c2 * dg0.abs()[active] + 1e-12).all())
    torch.testing.assert_close(res.f, f, atol=1e-12, rtol=0)


def test_line_search_backs_off_from_non_finite_values():
    """f = −log(1 − y) + y²/2 is finite only for y < 1; a first trial at y = 4 is NaN."""
    def evaluate(y):
        with torch.no_grad():
            f = -torch.log1p(-y[:, 0]) + 0.5 * y[:, 0] ** 2
            g = (1 / (1 - y[:, 0]) + y[:, 0])[:, None]
        return f, g

    y = torch.full((1, 1), -1.0, dtype=D64)
    f0, g0 = evaluate(y)
    res = strong_wolfe(evaluate, y, f0, g0, torch.ones_like(y), torch.full((1,), 5.0, dtype=D64),
                       torch.ones(1, dtype=torch.bool))
    assert bool(res.wolfe) and 0 < float(res.alpha) < 2 and bool(torch.isfinite(res.f).all())


def test_conjugate_gradient_solves_and_detects_negative_curvature():
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(3, 6, 6, generator=gen, dtype=D64)
    H = M @ M.mT + 0.1 * torch.eye(6, dtype=D64)
    H[2] = H[2] - 5 * torch.eye(6, dtype=D64) * torch.linalg.eigvalsh(H[2]).max()  # indefinite
    b = torch.randn(3, 6, generator=gen, dtype=D64)

    def hvp(v):
        return (H @ v.unsqueeze(-1)).squeeze(-1)

    res = conjugate_gradient(hvp, b, 1e-11 * b.norm(dim=-1), 100, true_residual=True)
    assert res.negative_curvature.tolist() == [False, False, True]
    assert res.converged.tolist() == [True, True, False]
    torch.testing.assert_close(res.x[:2], torch.linalg.solve(H[:2], b[:2]), atol=1e-8, rtol=0)
    # with the exact inverse as preconditioner the first iterate is the solution
    exact = conjugate_gradient(lambda v: (H[:2] @ v.unsqueeze(-1)).squeeze(-1), b[:2],
                               1e-10 * b[:2].norm(dim=-1), 100,
                               preconditioner=lambda r: torch.linalg.solve(H[:2], r))
    assert bool((exact.iterations <= 2).all())
    torch.testing.assert_close(exact.x, torch.linalg.solve(H[:2], b[:2]), atol=1e-10, rtol=0)


def _rosenbrock(n):
    def objective(x, y):
        return (100 * (y[..., 1:] - y[..., :-1] ** 2) ** 2 + (1 - y[..., :-1]) ** 2).sum(-1)

    return objective


@pytest.mark.parametrize("solver", [il.LBFGS, il.NewtonCG])
def test_extended_rosenbrock_from_several_starts(solver):
    starts = torch.tensor([[-1.2, 1.0, -1.2, 1.0], [0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 0.5, 3.0],
                           [1.0, 1.0, 1.0, 1.0]], dtype=D64)
    layer = il.ArgminLayer(_rosenbrock(4), solver=solver())
    y = layer(torch.zeros((), dtype=D64), starts)
    torch.testing.assert_close(y, torch.ones(4, 4, dtype=D64), atol=1e-8, rtol=0)
    st = layer.stats.forward
    assert st.all_converged and st.iterations[3] == 0  # the last start is the minimizer


def test_newton_cg_crosses_a_region_of_negative_curvature():
    """From y = 0.1 the double well's curvature 3y² − 1 is negative; Newton-CG must still
    descend (steepest descent there) and reach the minimum at y = 1."""
    layer = il.ArgminLayer(lambda x, y: (0.25 * y**4 - 0.5 * y**2 - x * y).sum(-1),
                           solver=il.NewtonCG())
    y = layer(torch.zeros(2, 1, dtype=D64), torch.tensor([[0.1], [2.0]], dtype=D64))
    torch.testing.assert_close(y, torch.ones(2, 1, dtype=D64), atol=1e-10, rtol=0)
    assert layer.stats.forward.extra["negative_curvature"].tolist() == [True, False]


@pytest.mark.parametrize("method", ["L-BFGS-B", "BFGS", "CG", "Newton-CG", "trust-ncg",
                                    "trust-krylov", "TNC"])
def test_scipy_minimize_methods(method):
    x = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=D64)
    y = il.functional.argmin(lambda x, y: (torch.cosh(y - x) + 0.1 * y**4).sum(-1), x,
                             torch.zeros_like(x), solver=il.ScipyMinimize(method))
    torch.testing.assert_close(torch.sinh(y - x) + 0.4 * y**3, torch.zeros_like(y), atol=1e-7, rtol=0)


def test_scipy_minimize_rejects_methods_that_need_the_full_hessian():
    with pytest.raises(ValueError, match="full Hessian"):
        il.ScipyMinimize("trust-exact")


@pytest.mark.parametrize("solver", [il.LevenbergMarquardt, il.GaussNewton])
def test_least_squares_solvers_per_sample(solver):
    """Circle fits of different sizes (residual ‖p − c‖ − R): each sample its own damping."""
    angles = torch.linspace(0, 6, 12, dtype=D64)
    truth = torch.tensor([[0.0, 0.0, 1.0], [5.0, -2.0, 30.0], [1e-3, 2e-3, 1e-2]], dtype=D64)
    pts = truth[:, None, :2] + truth[:, None, 2:] * torch.stack([angles.cos(), angles.sin()], -1)

    def residual(pts, p):
        return (pts - p[..., None, :2]).norm(dim=-1) - p[..., 2:]

    start = truth * torch.tensor([1.0, 1.0, 1.5], dtype=D64) + 0.1 * truth[:, 2:]
    layer = il.LeastSquaresLayer(residual, solver=solver())
    p = layer(pts, start)
    torch.testing.assert_close(p, truth, atol=1e-9, rtol=1e-9)
    assert layer.stats.forward.all_converged
