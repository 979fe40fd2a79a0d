"""LyapunovLayer / DiscreteLyapunovLayer: values against SciPy, derivatives, transforms."""

from __future__ import annotations

import pytest
import scipy.linalg as sla
import torch
from torch.autograd import gradcheck, gradgradcheck

from implicit_layers import functional as F

f64 = dict(dtype=torch.float64)
BACKENDS = ["schur", "eig"]


def stable(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, n, n, generator=g, **f64) - 2 * n**0.5 * torch.eye(n, **f64)


def contractive(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.4 * torch.randn(*batch, n, n, generator=g, **f64) / n**0.5


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **f64)


SOLVERS = {
    "continuous": (F.lyapunov, stable, lambda A, Q: sla.solve_continuous_lyapunov(A, -Q)),
    "discrete": (F.discrete_lyapunov, contractive, sla.solve_discrete_lyapunov),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", SOLVERS)
def test_matches_scipy(kind, backend):
    solve, make_a, reference = SOLVERS[kind]
    A, Q = make_a((3,), 6), rand(3, 6, 6)  # non-symmetric Q
    P = solve(A, Q, backend=backend)
    for i in range(3):
        ref = torch.from_numpy(reference(A[i].numpy(), Q[i].numpy()))
        torch.testing.assert_close(P[i], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", SOLVERS)
def test_symmetric_q_gives_symmetric_p(kind):
    solve, make_a, _ = SOLVERS[kind]
    Q = rand(5, 5)
    P = solve(make_a((), 5), Q @ Q.mT, backend="schur")
    torch.testing.assert_close(P, P.mT, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", SOLVERS)
@pytest.mark.parametrize("symmetric_q", [False, True])
def test_gradcheck_and_gradgradcheck(kind, backend, symmetric_q):
    solve, make_a, _ = SOLVERS[kind]
    A = make_a((2,), 3).requires_grad_()
    Q0 = rand(2, 3, 3)
    Q = (Q0 @ Q0.mT if symmetric_q else Q0).requires_grad_()

    def f(A, Q):
        return solve(A, Q, backend=backend)

    assert gradcheck(f, (A, Q))
    assert gradgradcheck(f, (A, Q))  # random, asymmetric output cotangents


def kron_lyapunov(A, Q):
    """Reference: (I⊗A + A⊗I) vec P = −vec Q (column-major vec), differentiated by autograd."""
    n = A.shape[-1]
    eye = torch.eye(n, **f64)
    K = torch.kron(eye, A) + torch.kron(A, eye)
    p = torch.linalg.solve(K, -Q.mT.reshape(n * n))
    return p.reshape(n, n).mT


@pytest.mark.parametrize("backend", BACKENDS)
def test_pullback_with_asymmetric_cotangent_matches_kronecker(backend):
    A, Q, P_bar = stable((), 5), rand(5, 5), rand(5, 5, seed=7)  # nothing symmetric
    A1, Q1 = A.clone().requires_grad_(), Q.clone().requires_grad_()
    (F.lyapunov(A1, Q1, backend=backend) * P_bar).sum().backward()
    A2, Q2 = A.clone().requires_grad_(), Q.clone().requires_grad_()
    (kron_lyapunov(A2, Q2) * P_bar).sum().backward()
    torch.testing.assert_close(A1.grad, A2.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(Q1.grad, Q2.grad, rtol=1e-9, atol=1e-11)
    # the closed form beside the code: W solves Aᵀ W + W A + P̄ = 0, Ā = W Pᵀ + Wᵀ P
    P = F.lyapunov(A, Q)
    W = F.lyapunov(A.mT, P_bar)
    torch.testing.assert_close(A1.grad, W @ P.mT + W.mT @ P, rtol=1e-9, atol=1e-11)
    assert (A1.grad - 2 * W @ P).abs().max() > 1e-3  # the symmetric shortcut would be wrong


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", SOLVERS)
def test_forward_mode_matches_finite_differences(kind, backend):
    solve, make_a, _ = SOLVERS[kind]
    A, Q = make_a((2,), 4), rand(2, 4, 4)
    dA, dQ = rand(2, 4, 4, seed=3), rand(2, 4, 4, seed=4)

    def f(A, Q):
        return solve(A, Q, backend=backend)

    _, tangent = torch.func.jvp(f, (A, Q), (dA, dQ))
    h = 1e-6
    fd = (f(A + h * dA, Q + h * dQ) - f(A - h * dA, Q - h * dQ)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)
    assert gradcheck(f, (A.requires_grad_(), Q.requires_grad_()), check_forward_ad=True,
                     check_backward_ad=False, check_undefined_grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", SOLVERS)
def test_vmap_equals_batched_call(kind, backend):
    solve, make_a, _ = SOLVERS[kind]
    A, Q = make_a((4,), 3), rand(4, 3, 3)

    def f(A, Q):
        return solve(A, Q, backend=backend)

    torch.testing.assert_close(torch.func.vmap(f)(A, Q), f(A, Q), rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.func.vmap(f, in_dims=(None, 0))(A[0], Q), f(A[0], Q))
    torch.testing.assert_close(torch.func.vmap(f, in_dims=(0, None))(A, Q[0]), f(A, Q[0]))

    def loss(A, Q):
        return f(A, Q).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)))(A, Q)
    batched = torch.func.grad(loss, argnums=(0, 1))(A, Q)
    for got, want in zip(per_sample, batched, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacobians_and_hessian_agree(backend):
    A, Q = stable((), 3), rand(3, 3)

    def f(A):
        return F.lyapunov(A, Q, backend=backend)

    torch.testing.assert_close(torch.func.jacrev(f)(A), torch.func.jacfwd(f)(A))

    def scalar(A):
        return f(A).square().sum()

    rev_rev = torch.func.jacrev(torch.func.jacrev(scalar))(A)
    fwd_rev = torch.func.jacfwd(torch.func.jacrev(scalar))(A)
    torch.testing.assert_close(rev_rev, fwd_rev, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(rev_rev, rev_rev.permute(2, 3, 0, 1), rtol=1e-9, atol=1e-11)


def test_broadcast_parameter_gets_summed_gradient():
    A, Q = stable((), 3).requires_grad_(), rand(4, 3, 3).requires_grad_()
    F.lyapunov(A, Q).sum().backward()
    want = sum(torch.autograd.grad(F.lyapunov(A, Q[i]).sum(), A)[0] for i in range(4))
    torch.testing.assert_close(A.grad, want)


def test_float32():
    A, Q = stable((3,), 5).float(), rand(3, 5, 5).float()
    for backend in BACKENDS:
        A1 = A.clone().requires_grad_()
        P = F.lyapunov(A1, Q, backend=backend)
        assert P.dtype == torch.float32
        torch.testing.assert_close(P.double(), F.lyapunov(A.double(), Q.double()),
                                   rtol=1e-4, atol=1e-5)
        P.sum().backward()
        assert A1.grad.dtype == torch.float32 and torch.isfinite(A1.grad).all()
