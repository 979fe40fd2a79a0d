"""The seed examples: implicit gradients equal torch's explicit autograd to 1e-10 (float64)."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import implicit_layers as il
from implicit_layers import functional as F
from tests.core import problems

ADJOINTS = {
    "direct": lambda: il.DirectAdjoint(),
    "gmres": lambda: il.KrylovAdjoint(il.GMRES(rtol=1e-13)),
    "bicgstab": lambda: il.KrylovAdjoint(il.BiCGStab(rtol=1e-13)),
}
SOLVERS = {"newton": il.Newton, "broyden": il.Broyden, "scipy": il.ScipyRoot}


def _grads(out, inputs, seed_out):
    return torch.autograd.grad((out * seed_out).sum(), inputs)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_linear_solve_matches_explicit(solver, adjoint):
    residual, (A, b), y0, ref = problems.linear_system()
    A.requires_grad_(), b.requires_grad_()
    y = F.root_find(residual, (A, b), y0, solver=SOLVERS[solver](), adjoint=ADJOINTS[adjoint]())
    y_ref = ref(A, b)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    seed = torch.randn_like(y)
    for g, g_ref in zip(_grads(y, (A, b), seed), _grads(y_ref, (A, b), seed)):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_matrix_inverse_matches_explicit(adjoint):
    residual, X, Y0, ref = problems.matrix_inverse()
    X.requires_grad_()
    Y = F.root_find(residual, X, Y0, adjoint=ADJOINTS[adjoint](), event_ndim=2)
    torch.testing.assert_close(Y, ref(X), atol=1e-10, rtol=0)
    seed = torch.randn_like(Y)
    torch.testing.assert_close(_grads(Y, X, seed)[0], _grads(ref(X), X, seed)[0], atol=1e-10, rtol=0)
    # forward mode
    X_dot = torch.randn_like(X)
    _, Y_dot = torch.func.jvp(
        lambda X: F.root_find(residual, X, Y0, adjoint=ADJOINTS[adjoint](), event_ndim=2),
        (X.detach(),), (X_dot,))
    _, Y_dot_ref = torch.func.jvp(ref, (X.detach(),), (X_dot,))
    torch.testing.assert_close(Y_dot, Y_dot_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_scalar_root_matches_explicit(solver):
    residual, x, y0, ref = problems.cube_root()
    x.requires_grad_()
    y = F.root_find(residual, x, y0, solver=SOLVERS[solver](), event_ndim=0)
    torch.testing.assert_close(y, ref(x), atol=1e-10, rtol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, 1 / (3 * y.detach() ** 2), atol=1e-10, rtol=0)


def test_linear_solve_jvp_matches_explicit():
    residual, (A, b), y0, ref = problems.linear_system()
    tangents = (torch.randn_like(A), torch.randn_like(b))
    _, y_dot = torch.func.jvp(lambda A, b: F.root_find(residual, (A, b), y0), (A, b), tangents)
    _, y_dot_ref = torch.func.jvp(ref, (A, b), tangents)
    torch.testing.assert_close(y_dot, y_dot_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_gradcheck_and_gradgradcheck(adjoint):
    residual, (A, b), y0, _ = problems.linear_system(batch=(2,), n=3)
    A.requires_grad_(), b.requires_grad_()

    def fn(A, b):
        return F.root_find(residual, (A, b), y0, adjoint=ADJOINTS[adjoint]())

    # iterative adjoints agree with themselves only to their tolerance
    tol = 0.0 if adjoint == "direct" else 1e-10
    assert gradcheck(fn, (A, b), nondet_tol=tol)
    assert gradgradcheck(fn, (A, b), nondet_tol=tol)


def test_gradgradcheck_nonlinear_with_fixed_point_adjoint():
    residual, (W, u), y0, _ = problems.tanh_equilibrium(batch=(2,), n=3)
    W.requires_grad_(), u.requires_grad_()
    adjoint = il.FixedPointAdjoint(il.Picard(tol=1e-13, rtol=0, max_iter=500))

    def fn(W, u):
        return F.root_find(residual, (W, u), y0, adjoint=adjoint)

    assert gradcheck(fn, (W, u), nondet_tol=1e-10)
    assert gradgradcheck(fn, (W, u), nondet_tol=1e-10)


def test_hessian_matches_explicit_both_orders():
    residual, (A, b), y0, ref = problems.linear_system(batch=(), n=3)

    def loss(b, solve):
        return solve(b).pow(3).sum()

    def implicit(b):
        return F.root_find(residual, (A, b), y0)

    def explicit(b):
        return ref(A, b)

    H_ref = torch.func.hessian(lambda b: loss(b, explicit))(b)
    for H in (torch.func.jacfwd(torch.func.jacrev(lambda b: loss(b, implicit)))(b),
              torch.func.jacrev(torch.func.jacrev(lambda b: loss(b, implicit)))(b)):
        torch.testing.assert_close(H, H_ref, atol=1e-10, rtol=0)
