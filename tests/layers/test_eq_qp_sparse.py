"""EqualityQPLayer, sparse backend: agreement with the dense backend, gradients on patterns."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.autograd import forward_ad

import implicit_layers as il
from implicit_layers import functional as F
from tests.layers.eq_qp_problems import DT, kkt_residual, reference

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def banded_qp(n=8, m=3, seed=0):
    """Tridiagonal PD Q and an A whose rows couple three neighbouring variables (torch COO)."""
    rng = np.random.default_rng(seed)
    Q = sp.diags([-np.ones(n - 1), 3 + rng.uniform(0, 1, n), -np.ones(n - 1)], [-1, 0, 1])
    rows = np.repeat(np.arange(m), 3)
    cols = ((np.arange(m) * (n - 3)) // max(m - 1, 1))[:, None] + np.arange(3)
    A = sp.coo_matrix((rng.standard_normal(3 * m), (rows, cols.ravel())), shape=(m, n))
    to_torch = lambda M: torch.tensor(M.toarray(), dtype=DT).to_sparse()  # noqa: E731
    c = torch.tensor(rng.standard_normal(n), dtype=DT)
    b = torch.tensor(rng.standard_normal(m), dtype=DT)
    return to_torch(sp.coo_matrix(Q)), c, to_torch(A), b


def test_matches_dense_backend_and_reference():
    Q, c, A, b = banded_qp(n=30, m=10)
    x, lam = F.eq_qp(Q, c, A, b)  # auto → sparse
    x_d, lam_d = F.eq_qp(Q.to_dense(), c, A.to_dense(), b, backend="dense")
    x_ref, lam_ref = reference(Q.to_dense(), c, A.to_dense(), b)
    torch.testing.assert_close(x, x_d)
    torch.testing.assert_close(lam, lam_d)
    torch.testing.assert_close(x, x_ref)
    assert kkt_residual(Q.to_dense(), c, A.to_dense(), b, x, lam) < 1e-12


def test_scipy_and_csr_inputs():
    Q, c, A, b = banded_qp()
    x, lam = F.eq_qp(Q, c, A, b)
    Qs = sp.csr_matrix(Q.to_dense().numpy())
    As = sp.csc_matrix(A.to_dense().numpy())
    x2, lam2 = F.eq_qp(Qs, c, As, b)
    x3, lam3 = F.eq_qp(Q.to_sparse_csr(), c, A.to_sparse_csr(), b, backend="sparse")
    for xi, li in ((x2, lam2), (x3, lam3)):
        torch.testing.assert_close(xi, x)
        torch.testing.assert_close(li, lam)


def test_gradients_on_the_pattern_equal_dense_gradients():
    Q, c, A, b = banded_qp(n=10, m=4)
    Qs, As = Q.clone().requires_grad_(), A.clone().requires_grad_()
    cs, bs = c.clone().requires_grad_(), b.clone().requires_grad_()
    x, lam = F.eq_qp(Qs, cs, As, bs)
    w = torch.linspace(-1, 1, 10, dtype=DT)
    ((x * w).sum() + lam.square().sum()).backward()
    Qd, Ad = Q.to_dense().requires_grad_(), A.to_dense().requires_grad_()
    cd, bd = c.clone().requires_grad_(), b.clone().requires_grad_()
    xd, lamd = F.eq_qp(Qd, cd, Ad, bd, backend="dense")
    ((xd * w).sum() + lamd.square().sum()).backward()
    assert Qs.grad.layout == torch.sparse_coo
    mask_Q, mask_A = Q.to_dense() != 0, A.to_dense() != 0
    torch.testing.assert_close(Qs.grad.to_dense(), Qd.grad * mask_Q)
    torch.testing.assert_close(As.grad.to_dense(), Ad.grad * mask_A)
    torch.testing.assert_close(cs.grad, cd.grad)
    torch.testing.assert_close(bs.grad, bd.grad)


def test_gradcheck_and_gradgradcheck_on_values():
    Q, c, A, b = banded_qp(n=5, m=2)
    Qc, Ac = Q.coalesce(), A.coalesce()

    def f(Qv, c, Av, b):
        Qm = torch.sparse_coo_tensor(Qc.indices(), Qv, Qc.shape)
        Am = torch.sparse_coo_tensor(Ac.indices(), Av, Ac.shape)
        return F.eq_qp(Qm, c, Am, b, backend="sparse")

    inputs = [t.clone().requires_grad_() for t in (Qc.values(), c, Ac.values(), b)]
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_forward_mode_matches_finite_differences():
    Q, c, A, b = banded_qp(n=6, m=2)
    backend = il.SparseKKTBackend()
    Qv, c, Av, b, problem = backend.prepare(Q, c, A, b)
    g = torch.Generator().manual_seed(0)
    vals = (Qv, c, Av, b)
    tangents = [torch.randn(v.shape, generator=g, dtype=DT) for v in vals]
    layer = il.EqualityQPLayer(backend)
    f = lambda Qv, c, Av, b: layer.sparse_values(Qv, c, Av, b, problem)  # noqa: E731
    with forward_ad.dual_level():
        outs = f(*[forward_ad.make_dual(v, t) for v, t in zip(vals, tangents, strict=True)])
        ad = [forward_ad.unpack_dual(o).tangent for o in outs]
    # finite differences re-factor at the perturbed values (through the public layer)
    Qc, Ac = Q.coalesce(), A.coalesce()

    def g_(Qv, c, Av, b):
        Qm = torch.sparse_coo_tensor(Qc.indices(), Qv, Qc.shape)
        Am = torch.sparse_coo_tensor(Ac.indices(), Av, Ac.shape)
        return F.eq_qp(Qm, c, Am, b)

    eps = 1e-6
    plus = g_(*[v + eps * t for v, t in zip(vals, tangents, strict=True)])
    minus = g_(*[v - eps * t for v, t in zip(vals, tangents, strict=True)])
    for a, p, m in zip(ad, plus, minus, strict=True):
        torch.testing.assert_close(a, (p - m) / (2 * eps), rtol=1e-6, atol=1e-7)


def test_large_problem_is_solved_to_high_accuracy():
    n, m = 20_000, 8_000
    rng = np.random.default_rng(1)
    Q = sp.diags([-np.ones(n - 1), 3 + rng.uniform(0, 1, n), -np.ones(n - 1)], [-1, 0, 1])
    cols = ((np.arange(m) * (n - 3)) // (m - 1))[:, None] + np.arange(3)
    A = sp.csr_matrix((rng.standard_normal(3 * m), (np.repeat(np.arange(m), 3), cols.ravel())),
                      shape=(m, n))
    c = torch.tensor(rng.standard_normal(n), dtype=DT, requires_grad=True)
    b = torch.tensor(rng.standard_normal(m), dtype=DT, requires_grad=True)
    x, lam = il.EqualityQPLayer("sparse")(Q, c, A, b)
    xn, ln = x.detach().numpy(), lam.detach().numpy()
    assert np.abs(Q @ xn + c.detach().numpy() + A.T @ ln).max() < 1e-10
    assert np.abs(A @ xn - b.detach().numpy()).max() < 1e-10
    x.sum().backward()
    # c̄ = −w_x with K w = (1, 0): check the adjoint system's residual
    w = -c.grad.numpy()
    assert np.abs(Q @ w + A.T @ b.grad.numpy() - 1).max() < 1e-10
    assert np.abs(A @ w).max() < 1e-10
