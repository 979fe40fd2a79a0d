"""LeastSquaresLayer / F.least_squares: SciPy's least_squares, the adjoint with and without the
second-order term, Theseus' backward test, rank deficiency, gradcheck, forward mode, vmap."""

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import vmap

import implicit_layers as il
from implicit_layers import functional as F
from tests.layers import argmin_problems as P
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)

D64 = torch.float64
SOLVERS = {"lm": il.LevenbergMarquardt, "gauss_newton": il.GaussNewton, "lbfgs": il.LBFGS}


@pytest.mark.parametrize("solver", SOLVERS)
def test_exponential_decay_fit_matches_scipy_least_squares(solver):
    residual, (t, data), _ = P.exp_decay()
    p = F.least_squares(residual, (t, data), torch.ones(3, 3, dtype=D64), solver=SOLVERS[solver]())
    for b in range(3):
        ref = scipy.optimize.least_squares(
            lambda q, b=b: q[0] * np.exp(-q[1] * t.numpy()) + q[2] - data[b].numpy(), np.ones(3),
            jac="3-point", xtol=1e-15, ftol=1e-15, gtol=1e-15)
        torch.testing.assert_close(p[b], torch.as_tensor(ref.x), atol=1e-7, rtol=0)


def _exact_sensitivity(residual, t, data, p):
    """d p*/d data = H⁻¹ Jᵀ with H the exact Hessian of ½‖r‖² (torch.func.hessian), and the
    Gauss-Newton approximation (JᵀJ)⁻¹ Jᵀ; r = model(p) − data, so ∂(Jᵀr)/∂data = −Jᵀ."""
    def half_sq(p):
        return 0.5 * residual((t, data), p).square().sum()

    H = torch.func.hessian(half_sq)(p)
    J = torch.func.jacrev(lambda p: residual((t, data), p))(p)
    return torch.linalg.solve(H, J.T), torch.linalg.solve(J.T @ J, J.T)


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_adjoint_with_and_without_the_second_order_term(noise):
    """Zero residual at the solution (clean data): the Gauss-Newton solution is the exact
    adjoint and the preconditioned CG confirms it. Large residual (noisy data): only the
    second-order term gives the exact gradient; Gauss-Newton alone is measurably off."""
    residual, (t, data), _ = P.exp_decay(batch=(), noise=noise, seed=1)
    data = data.clone().requires_grad_()
    grads = {}
    for exact in (True, False):
        layer = il.LeastSquaresLayer(residual, adjoint=il.LeastSquaresAdjoint(second_order=exact))
        p = layer((t, data), torch.ones(3, dtype=D64))
        (grads[exact],) = torch.autograd.grad(p[1], data)  # how each datum moves the rate k
        solver = layer.stats.backward.solver
        assert solver == ("GaussNewtonPCG" if exact else "GaussNewton")
    sens_exact, sens_gn = _exact_sensitivity(residual, t, data.detach(), p.detach())
    torch.testing.assert_close(grads[True], sens_exact[1], atol=1e-9, rtol=0)
    torch.testing.assert_close(grads[False], sens_gn[1], atol=1e-9, rtol=0)
    gap = float((sens_exact[1] - sens_gn[1]).abs().max() / sens_exact[1].abs().max())
    if noise == 0.0:
        assert gap < 1e-8  # S = Σ rᵢ ∇²rᵢ vanishes with the residual
    else:
        assert gap > 1e-3  # the second-order term matters


def _quadratic_fit_data(num_points=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(num_points, generator=gen, dtype=D64)
    y = 1.0 * x.square() + 0.5 + 0.01 * torch.randn(num_points, generator=gen, dtype=D64)
    return x, y


@pytest.mark.parametrize("squared", [False, True])
def test_theseus_quadratic_fit_backward(squared):
    """Theseus' backward test: fit a·x² + b to data, differentiate the optimal a in the data x
    against the implicit function theorem written out with dense autograd derivatives at the
    solution, −(∇²_ab f)⁻¹ ∇²_{ab,x} f, and against central differences of the solve (as loose
    as the solves are accurate); residuals err and err² (the latter a quartic objective whose
    residual does not vanish at the solution)."""
    x, y = _quadratic_fit_data()

    def residual(data, ab):
        x, y = data
        err = y - (ab[..., :1] * x.square() + ab[..., 1:])
        return err.square() if squared else err

    def solve(x):
        return F.least_squares(residual, (x, y), torch.tensor([2.0, 1.0], dtype=D64))

    x_ = x.clone().requires_grad_()
    ab = solve(x_)
    (grad,) = torch.autograd.grad(ab[0], x_)

    def half_sq(ab, x):
        return 0.5 * residual((x, y), ab).square().sum()

    H = torch.func.hessian(half_sq)(ab.detach(), x)
    mixed = torch.func.jacrev(torch.func.grad(half_sq), argnums=1)(ab.detach(), x)
    torch.testing.assert_close(grad, -torch.linalg.solve(H, mixed)[0], atol=1e-10, rtol=0)
    eps = 1e-4
    numeric = torch.stack([(solve(x + eps * e)[0] - solve(x - eps * e)[0]) / (2 * eps)
                           for e in torch.eye(len(x), dtype=D64)])
    torch.testing.assert_close(grad, numeric, atol=1e-4, rtol=0)  # Theseus: 1e-4


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("problem", ["rosenbrock", "variably_dimensioned"])
def test_optimistix_least_squares_problems_and_jvp(problem, solver):
    """Optimistix' least-squares tests: the minimum, and the JVP of the solution in the
    problem's argument against finite differences."""
    fn = {"rosenbrock": P.rosenbrock_residual, "variably_dimensioned": P.variably_dimensioned}[problem]
    c = torch.tensor(1.0, dtype=D64)
    y0 = torch.full((4,), 1.5, dtype=D64) if problem == "rosenbrock" else 1 - torch.arange(1, 5) / 10

    def solve(c):
        return F.least_squares(fn, c, y0.to(D64), solver=SOLVERS[solver](max_iter=2000), tol=1e-13)

    y = solve(c)
    assert float(fn(c, y).square().sum()) < 1e-16
    torch.testing.assert_close(y, torch.ones(4, dtype=D64), atol=1e-6, rtol=0)
    c1 = torch.tensor(1.2, dtype=D64)  # away from 1 the Rosenbrock residual does not vanish
    _, tangent = torch.func.jvp(solve, (c1,), (torch.ones((), dtype=D64),))
    eps = 1e-6
    fd = (solve(c1 + eps) - solve(c1 - eps)) / (2 * eps)
    torch.testing.assert_close(tangent, fd, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("solver", ["lbfgs", "newton_cg", "scipy"])
@pytest.mark.parametrize("problem", ["beale", "matyas", "diagonal_bowl"])
def test_optimistix_minimisation_problems_and_jvp(problem, solver):
    """Optimistix' minimise tests (Beale, Matyas, a diagonal bowl) through ArgminLayer."""
    fn, x, y0, minimizer = {
        "beale": (P.beale, torch.tensor([1.5, 2.25, 2.625]), torch.tensor([2.0, 0.0]),
                  torch.tensor([3.0, 0.5])),
        "matyas": (P.matyas, torch.tensor([0.26, 0.48]), torch.tensor([6.0, 6.0]),
                   torch.zeros(2)),
        "diagonal_bowl": (P.diagonal_bowl, torch.randn(6), torch.full((6,), 0.05), torch.zeros(6)),
    }[problem]
    x, y0, minimizer = x.to(D64), y0.to(D64), minimizer.to(D64)
    make = {"lbfgs": il.LBFGS, "newton_cg": il.NewtonCG, "scipy": il.ScipyMinimize}[solver]

    def solve(x):
        return F.argmin(fn, x, y0, solver=make())

    y = solve(x)
    torch.testing.assert_close(y, minimizer, atol=1e-6, rtol=0)
    dx = torch.randn_like(x)
    _, tangent = torch.func.jvp(solve, (x,), (dx,))
    eps = 1e-6
    fd = (solve(x + eps * dx) - solve(x - eps * dx)) / (2 * eps)
    torch.testing.assert_close(tangent, fd, atol=1e-5, rtol=1e-5)


def test_rank_deficient_jacobian_is_named():
    """r = y₀ + y₁ − x: every point on a line is a minimizer."""
    x = torch.tensor([1.0], dtype=D64, requires_grad=True)

    def residual(x, y):
        return (y[..., :1] + y[..., 1:]) - x

    with pytest.raises(il.SingularSystemError, match="rank deficient"):
        F.least_squares(residual, x, torch.zeros(2, dtype=D64), solver=il.GaussNewton())
    y = F.least_squares(residual, x, torch.zeros(2, dtype=D64))  # damping copes in the forward
    torch.testing.assert_close(y.sum(), x[0].detach(), atol=1e-10, rtol=0)
    with pytest.raises(il.SingularSystemError, match="rank deficient"):
        y.sum().backward()


def test_gradcheck_and_gradgradcheck():
    residual, (t, data), _ = P.exp_decay(batch=(), n_points=5, noise=0.2)
    data = data.requires_grad_()

    def solve(data):
        return F.least_squares(residual, (t, data), torch.ones(3, dtype=D64))

    assert torch.autograd.gradcheck(solve, (data,), atol=1e-6)
    assert torch.autograd.gradgradcheck(solve, (data,), atol=1e-5)


def test_gauss_newton_adjoint_is_exact_for_linear_residuals():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(8, 3, generator=gen, dtype=D64, requires_grad=True)
    b = torch.randn(8, generator=gen, dtype=D64, requires_grad=True)
    adjoint = il.LeastSquaresAdjoint(second_order=False)

    def solve(A, b):
        return F.least_squares(lambda x, y: y @ x[0].T - x[1], (A, b), torch.zeros(3, dtype=D64),
                               adjoint=adjoint)

    torch.testing.assert_close(solve(A, b), torch.linalg.lstsq(A, b).solution, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(solve, (A, b), atol=1e-6)


def test_forward_mode_and_vmap():
    residual, (t, data), _ = P.exp_decay(batch=(4,), noise=0.2)
    y0 = torch.ones(4, 3, dtype=D64)

    def solve(data, y0=y0):
        return F.least_squares(residual, (t, data), y0)

    torch.testing.assert_close(vmap(solve)(data, y0), solve(data), atol=1e-10, rtol=0)
    d_data = torch.randn_like(data)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(solve(fwAD.make_dual(data, d_data))).tangent
    J = torch.func.jacrev(solve)(data)  # (4, 3, 4, 25)
    torch.testing.assert_close(tangent, torch.einsum("bpcn,cn->bp", J, d_data), atol=1e-9, rtol=0)


class Decay(nn.Module):
    """A residual with a learned time scale: r = a e^{−k s t} + c − data."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.3, dtype=D64))

    def forward(self, x, p):
        t, data = x
        return p[..., :1] * torch.exp(-p[..., 1:2] * self.s * t) + p[..., 2:] - data


def test_residual_module_parameters_receive_gradients():
    _, (t, data), _ = P.exp_decay(batch=(), noise=0.1)
    model = Decay()
    p = il.LeastSquaresLayer(model)((t, data), torch.ones(3, dtype=D64))
    p[1].backward()
    # k·s is what the data determine: the product is invariant, so d k*/d s = −k*/s
    torch.testing.assert_close(model.s.grad, -p[1].detach() / model.s.detach(), atol=1e-8, rtol=0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="needs a least-squares problem"):
        F.argmin(lambda x, y: y.square().sum(-1), torch.ones(2, dtype=D64),
                 torch.zeros(2, dtype=D64), solver=il.GaussNewton())
    with pytest.raises(ValueError, match="batch dims"):
        F.least_squares(lambda x, y: y.sum(0), torch.ones(3, dtype=D64), torch.zeros(3, 2, dtype=D64))
    with pytest.raises(ValueError, match="residual must be callable"):
        il.LeastSquaresLayer(None)
    with pytest.raises(ValueError, match="damping"):
        il.LevenbergMarquardt(damping=0.0)
