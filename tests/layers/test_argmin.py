"""ArgminLayer / F.argmin: closed forms, scikit-learn, gradcheck/gradgradcheck, forward mode,
vmap, module parameters, saddle points and the failure policy."""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import jacfwd, jacrev, vmap

import implicit_layers as il
from implicit_layers import functional as F
from tests.layers import argmin_problems as P
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)

D64 = torch.float64
SOLVERS = {"lbfgs": il.LBFGS, "newton_cg": il.NewtonCG, "scipy": il.ScipyMinimize}
ADJOINTS = {"cholesky": lambda: il.HessianAdjoint("cholesky"), "cg": lambda: il.HessianAdjoint("cg")}


@pytest.mark.parametrize("adjoint", ADJOINTS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_ridge_solution_and_lambda_derivative_match_closed_form(solver, adjoint):
    objective, (X, t, lam), solution, d_lambda = P.ridge()
    lam = lam.clone().requires_grad_()
    w = F.argmin(objective, (X, t, lam), torch.zeros(4, 5, dtype=D64), solver=SOLVERS[solver](),
                 adjoint=ADJOINTS[adjoint]())
    tol = 1e-7 if solver == "scipy" else 1e-10  # SciPy stops at sqrt(eps) gradients
    torch.testing.assert_close(w, solution(X, t, lam.detach()), atol=tol, rtol=0)
    (g,) = torch.autograd.grad(w.pow(2).sum(), lam)  # ⟨2w, dw/dλ⟩ per problem
    expected = (2 * w.detach() * d_lambda(X, t, lam.detach())).sum(-1)
    torch.testing.assert_close(g, expected, atol=tol, rtol=0)


def test_jaxopt_ridge_jacobians_in_lambda():
    """JAXopt's implicit-diff test: make_regression(10 × 3), λ = 5, objective
    ½ mean(r²) + ½ λ‖w‖²; the VJP (jacrev) and JVP (jacfwd) Jacobians in λ."""
    from sklearn import datasets

    X, y = datasets.make_regression(n_samples=10, n_features=3, random_state=0)
    X, y = torch.as_tensor(X), torch.as_tensor(y)

    def objective(lam, w):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * lam * (w**2).sum()

    def solve(lam):
        return F.argmin(objective, lam, torch.zeros(3, dtype=D64))

    lam = torch.tensor(5.0, dtype=D64)
    H = X.T @ X / 10 + lam * torch.eye(3, dtype=D64)
    w = torch.linalg.solve(H, X.T @ y / 10)
    torch.testing.assert_close(solve(lam), w, atol=1e-9, rtol=0)
    for jac in (jacrev(solve)(lam), jacfwd(solve)(lam)):
        torch.testing.assert_close(jac, -torch.linalg.solve(H, w), atol=1e-10, rtol=0)


@pytest.mark.parametrize("solver", ["lbfgs", "newton_cg"])
def test_logistic_regression_matches_scikit_learn(solver):
    from sklearn.linear_model import LogisticRegression

    objective, (X, s, C) = P.logistic()
    w = F.argmin(objective, (X, s, C), torch.zeros(4, dtype=D64), solver=SOLVERS[solver]())
    clf = LogisticRegression(C=float(C), fit_intercept=False, tol=1e-12, max_iter=10_000)
    clf.fit(X.numpy(), s.numpy())
    torch.testing.assert_close(w, torch.as_tensor(clf.coef_[0]), atol=1e-6, rtol=0)


def _logistic_solve(X, s, C):
    objective, _ = P.logistic()
    return F.argmin(objective, (X, s, C), torch.zeros(X.shape[-1], dtype=D64))


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_gradcheck_and_gradgradcheck(adjoint):
    objective, (X, s, C) = P.logistic(n_samples=5, n_features=2)
    X, C = X.requires_grad_(), C.clone().requires_grad_()

    def solve(X, C):
        return F.argmin(objective, (X, s, C), torch.zeros(2, dtype=D64),
                        adjoint=ADJOINTS[adjoint]())

    assert torch.autograd.gradcheck(solve, (X, C), atol=1e-6)
    assert torch.autograd.gradgradcheck(solve, (X, C), atol=1e-5)


def test_forward_mode_matches_finite_differences():
    objective, (X, t, lam), solution, _ = P.ridge(batch=(3,))
    dX, dlam = torch.randn_like(X), torch.randn_like(lam)
    y0 = torch.zeros(3, 5, dtype=D64)
    with fwAD.dual_level():
        w = F.argmin(objective, (fwAD.make_dual(X, dX), t, fwAD.make_dual(lam, dlam)), y0)
        tangent = fwAD.unpack_dual(w).tangent
    _, expected = torch.func.jvp(lambda X, lam: solution(X, t, lam), (X, lam), (dX, dlam))
    torch.testing.assert_close(tangent, expected, atol=1e-9, rtol=0)
    eps = 1e-6
    fd = (solution(X + eps * dX, t, lam + eps * dlam) - solution(X - eps * dX, t, lam - eps * dlam))
    torch.testing.assert_close(tangent, fd / (2 * eps), atol=1e-7, rtol=0)
    _, t2 = torch.func.jvp(lambda X: F.argmin(objective, (X, t, lam), y0), (X,), (dX,))
    torch.testing.assert_close(t2, torch.func.jvp(lambda X: solution(X, t, lam), (X,), (dX,))[1],
                               atol=1e-9, rtol=0)


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_vmap_equals_the_batched_call(adjoint):
    objective, (X, s, C) = P.logistic(n_samples=20, n_features=3)
    Xs = torch.stack([X, 0.5 * X, -X, 2 * X])

    def solve(X):
        return F.argmin(objective, (X, s, C), torch.zeros(*X.shape[:-2], 3, dtype=D64),
                        adjoint=ADJOINTS[adjoint]())

    torch.testing.assert_close(vmap(solve)(Xs), solve(Xs), atol=1e-10, rtol=0)
    grads = vmap(torch.func.grad(lambda X: solve(X).sin().sum()))(Xs)
    Xs_ = Xs.clone().requires_grad_()
    (expected,) = torch.autograd.grad(solve(Xs_).sin().sum(), Xs_)
    torch.testing.assert_close(grads, expected, atol=1e-9, rtol=0)


class Ridge(nn.Module):
    """Learned per-feature penalties exp(θ): the objective's parameters get gradients."""

    def __init__(self, X, t):
        super().__init__()
        self.X, self.t = X, t
        self.log_penalty = nn.Parameter(torch.zeros(X.shape[-1], dtype=D64))

    def forward(self, x, w):
        res = w @ self.X.T - self.t
        return 0.5 * res.square().mean(-1) + 0.5 * (self.log_penalty.exp() * w.square()).sum(-1)


def test_objective_module_parameters_receive_the_implicit_gradient():
    gen = torch.Generator().manual_seed(3)
    X, t = torch.randn(40, 4, generator=gen, dtype=D64), torch.randn(40, generator=gen, dtype=D64)
    model = Ridge(X, t)
    layer = il.ArgminLayer(model)
    w = layer(torch.zeros((), dtype=D64), torch.zeros(4, dtype=D64))
    w.square().sum().backward()
    theta = model.log_penalty.detach().clone().requires_grad_()
    w_ref = torch.linalg.solve(X.T @ X / 40 + torch.diag(theta.exp()), X.T @ t / 40)
    (g,) = torch.autograd.grad(w_ref.square().sum(), theta)
    torch.testing.assert_close(model.log_penalty.grad, g, atol=1e-10, rtol=0)
    assert isinstance(model.log_penalty, nn.Parameter)


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_saddle_point_is_reported_not_differentiated(adjoint):
    """f = (y₀ − x)² − (y₁ − x)² is stationary at y = (x, x), a saddle; started there the
    forward solve converges at once, the backward refuses the indefinite Hessian."""
    x = torch.tensor([0.5, -1.0], dtype=D64, requires_grad=True)

    def saddle(x, y):
        return (y[..., 0] - x) ** 2 - (y[..., 1] - x) ** 2

    y = F.argmin(saddle, x, x.detach()[:, None].expand(2, 2).clone(), adjoint=ADJOINTS[adjoint]())
    with pytest.raises(il.SingularSystemError, match="saddle point or a maximum"):
        y.sum().backward()


def test_minimum_of_a_nonconvex_objective_is_differentiated():
    """A double well: from y0 = 0.1 the solvers reach the minimum at y = √(1 + x)... with
    positive curvature, where dy/dx = 1 / (2y) (from ∇f = y³ − (1 + x) y = 0)."""
    x = torch.tensor([0.2, 0.5], dtype=D64, requires_grad=True)

    def well(x, y):
        return 0.25 * y**4 - 0.5 * (1 + x) * y**2

    for solver in (il.LBFGS(), il.NewtonCG()):
        y = F.argmin(well, x, torch.full((2,), 0.1, dtype=D64), solver=solver, event_ndim=0)
        torch.testing.assert_close(y, (1 + x.detach()).sqrt(), atol=1e-10, rtol=0)
        (g,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(g, 1 / (2 * y.detach()), atol=1e-9, rtol=0)


def test_per_sample_stopping_and_stats():
    objective, (X, t, lam), solution, _ = P.ridge(batch=(3,))
    y0 = torch.zeros(3, 5, dtype=D64)
    y0[1] = solution(X, t, lam)[1]  # sample 1 starts at its minimizer
    layer = il.ArgminLayer(objective)
    layer((X, t, lam), y0)
    st = layer.stats.forward
    assert st.all_converged and st.iterations[1] == 0 and bool((st.iterations[[0, 2]] > 0).all())
    tol, rtol = il.LBFGS().tolerances(D64)
    assert bool((st.residual <= tol + rtol * solution(X, t, lam).norm(dim=-1)).all())


def test_float32():
    objective, (X, t, lam), solution, d_lambda = P.ridge(batch=(2,))
    X32, t32, lam32 = X.float(), t.float(), lam.float().requires_grad_()
    w = F.argmin(objective, (X32, t32, lam32), torch.zeros(2, 5))
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), solution(X, t, lam), atol=1e-4, rtol=0)
    (g,) = torch.autograd.grad(w.sum(), lam32)
    torch.testing.assert_close(g.double(), d_lambda(X, t, lam).sum(-1), atol=1e-3, rtol=0)


def test_failures_are_reported():
    objective, (X, t, lam), _, _ = P.ridge(batch=(2,))
    y0 = torch.zeros(2, 5, dtype=D64)
    with pytest.raises(il.ConvergenceError, match="did not converge"):
        F.argmin(objective, (X, t, lam), y0, max_iter=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.argmin(objective, (X, t, lam), y0, max_iter=2, on_failure="warn")
    assert any(issubclass(w.category, il.ConvergenceWarning) for w in caught)
    # unbounded below: never a converged status
    with pytest.raises(il.ConvergenceError):
        F.argmin(lambda x, y: -(y * x).sum(-1), torch.ones(2, dtype=D64),
                 torch.zeros(2, dtype=D64), max_iter=30)


def test_bad_input_is_named():
    y0 = torch.zeros(3, 2, dtype=D64)
    with pytest.raises(ValueError, match="one value per sample"):
        F.argmin(lambda x, y: y.square(), torch.ones(3, dtype=D64), y0)
    with pytest.raises(ValueError, match="objective must be callable"):
        il.ArgminLayer("not a function")
    with pytest.raises(ValueError, match="minimizes an objective"):
        F.root_find(lambda x, y: y - x, torch.ones(3, 2, dtype=D64), y0, solver=il.LBFGS())
    with pytest.raises(ValueError, match="method must be one of"):
        il.HessianAdjoint("lu")
    with pytest.raises(ValueError, match="memory"):
        il.LBFGS(memory=0)
    with pytest.raises(ValueError, match="c1 < c2"):
        il.NewtonCG(c1=0.9, c2=0.1)
    with pytest.raises(ValueError, match="y0 contains NaN"):
        F.argmin(lambda x, y: y.square().sum(-1), torch.ones(3, dtype=D64),
                 torch.full((3, 2), float("nan"), dtype=D64))


@pytest.mark.parametrize("solver", [il.LBFGS, il.NewtonCG, il.LevenbergMarquardt])
def test_matrix_unknowns_and_empty_batches(solver):
    """event_ndim=2: Y* = X / (1 + λ) for ½‖Y − X‖² + ½λ‖Y‖² (the residual form for LM)."""
    X = torch.randn(3, 2, 2, dtype=D64, requires_grad=True)
    lam = 0.5

    def objective(X, Y):
        return 0.5 * ((Y - X) ** 2).sum((-1, -2)) + 0.5 * lam * (Y**2).sum((-1, -2))

    def residual(X, Y):
        return torch.cat([(Y - X).flatten(-2), lam**0.5 * Y.flatten(-2)], -1)

    def solve(X):
        if solver is il.LevenbergMarquardt:
            return F.least_squares(residual, X, torch.zeros_like(X), event_ndim=2)
        return F.argmin(objective, X, torch.zeros_like(X), solver=solver(), event_ndim=2)

    Y = solve(X)
    torch.testing.assert_close(Y, X.detach() / (1 + lam), atol=1e-10, rtol=0)
    (g,) = torch.autograd.grad(Y.sum(), X)
    torch.testing.assert_close(g, torch.full_like(X, 1 / (1 + lam)), atol=1e-10, rtol=0)
    empty = solve(X[:0])
    assert empty.shape == (0, 2, 2)
