"""EqualityQPLayer, dense backend: values, derivatives of every order and mode, batching."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad, gradcheck, gradgradcheck

import implicit_layers as il
from implicit_layers import functional as F
from tests.layers.eq_qp_problems import DT, count_calls, kkt_residual, random_qp, reference

FACTORIZATIONS = ["schur", "ldl"]
# forward_ad's internals trigger torch's own deprecation warning of torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def layer(factorization="auto", refine=1):
    return il.EqualityQPLayer(il.DenseKKTBackend(factorization, refine=refine))


@pytest.mark.parametrize("factorization", ["auto", *FACTORIZATIONS])
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_matches_numpy_reference(factorization, batch):
    Q, c, A, b = random_qp(batch, n=6, m=3)
    x, lam = layer(factorization)(Q, c, A, b)
    x_ref, lam_ref = reference(Q, c, A, b)
    torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lam, lam_ref, rtol=1e-10, atol=1e-10)


def test_closed_form_projection():
    # min ½‖x‖² + cᵀx s.t. 1ᵀx = 1: x = −c + (1 + Σc)/n · 1, λ = −(1 + Σc)/n
    c = torch.tensor([0.3, -1.0, 2.0], dtype=DT)
    x, lam = F.eq_qp(torch.eye(3, dtype=DT), c, torch.ones(1, 3, dtype=DT), torch.ones(1, dtype=DT))
    t = (1 + c.sum()) / 3
    torch.testing.assert_close(x, -c + t)
    torch.testing.assert_close(lam, -t.reshape(1))


def test_indefinite_q_uses_ldl_and_is_a_minimum():
    Q, c, A, b = random_qp((2,), n=5, m=2, pd=False)
    assert bool((torch.linalg.eigvalsh(Q)[..., 0] < 0).all())  # Q itself is indefinite
    x, lam = layer()(Q, c, A, b)
    x_ref, lam_ref = reference(Q, c, A, b)
    torch.testing.assert_close(x, x_ref)
    torch.testing.assert_close(lam, lam_ref)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("shapes", ["unbatched", "batched", "broadcast"])
def test_gradcheck_and_gradgradcheck(factorization, shapes):
    if shapes == "unbatched":
        Q, c, A, b = random_qp((), n=3, m=2)
    elif shapes == "batched":
        Q, c, A, b = random_qp((2,), n=3, m=2)
    else:  # one Q and A shared by a batch of c and b
        Q, c, A, b = random_qp((), n=3, m=2)
        c = c + torch.linspace(0, 1, 2, dtype=DT).reshape(2, 1)
        b = b + torch.linspace(0, 1, 2, dtype=DT).reshape(2, 1)
    Q = Q + 0.1 * torch.randn(Q.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    inputs = [t.clone().requires_grad_() for t in (Q, c, A, b)]
    f = layer(factorization)
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


def test_nonsymmetric_q_is_read_as_symmetric_part_with_symmetric_gradient():
    Q, c, A, b = random_qp((), n=5, m=2)
    skew = torch.randn(5, 5, dtype=DT)
    skew = skew - skew.T
    Qn = (Q + skew).requires_grad_()
    x, lam = layer()(Qn, c, A, b)
    x_sym, _ = layer()(Q, c, A, b)
    torch.testing.assert_close(x, x_sym)
    (x.sum() + lam.sum()).backward()
    torch.testing.assert_close(Qn.grad, Qn.grad.T)


def test_broadcast_input_receives_summed_gradient():
    Q, c, A, b = random_qp((), n=4, m=2)
    cs = c + torch.randn(3, 4, dtype=DT)
    Q1, A1 = Q.clone().requires_grad_(), A.clone().requires_grad_()
    x, lam = layer()(Q1, cs, A1, b)
    (x.square().sum() + lam.sum()).backward()
    gQ, gA = torch.zeros_like(Q), torch.zeros_like(A)
    for k in range(3):
        Qk, Ak = Q.clone().requires_grad_(), A.clone().requires_grad_()
        xk, lk = layer()(Qk, cs[k], Ak, b)
        (xk.square().sum() + lk.sum()).backward()
        gQ, gA = gQ + Qk.grad, gA + Ak.grad
    torch.testing.assert_close(Q1.grad, gQ)
    torch.testing.assert_close(A1.grad, gA)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_forward_mode_matches_finite_differences(factorization):
    Q, c, A, b = random_qp((2,), n=5, m=2)
    g = torch.Generator().manual_seed(3)
    tangents = [torch.randn(t.shape, generator=g, dtype=DT) for t in (Q, c, A, b)]
    f = layer(factorization)
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(t, d) for t, d in zip((Q, c, A, b), tangents, strict=True)]
        outs = f(*duals)
        jvp_ad = [forward_ad.unpack_dual(o).tangent for o in outs]
    eps = 1e-6
    plus = f(*[t + eps * d for t, d in zip((Q, c, A, b), tangents, strict=True)])
    minus = f(*[t - eps * d for t, d in zip((Q, c, A, b), tangents, strict=True)])
    for ad, p, m in zip(jvp_ad, plus, minus, strict=True):
        torch.testing.assert_close(ad, (p - m) / (2 * eps), rtol=1e-6, atol=1e-7)
    _, jvp_func = torch.func.jvp(lambda *a: f(*a), (Q, c, A, b), tuple(tangents))
    for a, b_ in zip(jvp_func, jvp_ad, strict=True):
        torch.testing.assert_close(a, b_)


def test_jacfwd_equals_jacrev_and_hessian():
    Q, c, A, b = random_qp((), n=4, m=2)
    f = layer()

    def loss(Q, c, A, b):
        x, lam = f(Q, c, A, b)
        return (x * torch.arange(1.0, 5.0, dtype=DT)).sum() + lam.square().sum()

    for argnum in range(4):
        jf = torch.func.jacfwd(loss, argnums=argnum)(Q, c, A, b)
        jr = torch.func.jacrev(loss, argnums=argnum)(Q, c, A, b)
        torch.testing.assert_close(jf, jr)
    H_fr = torch.func.jacfwd(torch.func.jacrev(loss, argnums=1), argnums=1)(Q, c, A, b)
    H_rr = torch.func.jacrev(torch.func.jacrev(loss, argnums=1), argnums=1)(Q, c, A, b)
    torch.testing.assert_close(H_fr, H_rr)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_vmap_equals_batched_call(factorization):
    Q, c, A, b = random_qp((3,), n=5, m=2)
    f = layer(factorization)
    x_b, lam_b = f(Q, c, A, b)
    x_v, lam_v = torch.func.vmap(f)(Q, c, A, b)
    torch.testing.assert_close(x_v, x_b)
    torch.testing.assert_close(lam_v, lam_b)
    # vmap over c only, with a Q and A that carry their own batch dim
    x_v2, _ = torch.func.vmap(f, in_dims=(None, 0, None, None))(Q, c[None].expand(2, 3, 5), A, b)
    torch.testing.assert_close(x_v2, x_b.expand(2, 3, 5))
    # per-sample gradients by vmap(grad) equal those of separate calls
    grads = torch.func.vmap(torch.func.grad(lambda *a: f(*a)[0].sum(), argnums=(0, 2)))(Q, c, A, b)
    for k in range(3):
        Qk, Ak = Q[k].clone().requires_grad_(), A[k].clone().requires_grad_()
        f(Qk, c[k], Ak, b[k])[0].sum().backward()
        torch.testing.assert_close(grads[0][k], Qk.grad)
        torch.testing.assert_close(grads[1][k], Ak.grad)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_factorization_is_computed_once(monkeypatch, factorization):
    names = ("cholesky_ex", "ldl_factor_ex", "lu_factor", "lu_factor_ex", "solve", "inv")
    calls = count_calls(monkeypatch, names)
    Q, c, A, b = random_qp((2,), n=5, m=2)
    inputs = [t.clone().requires_grad_() for t in (Q, c, A, b)]
    x, lam = layer(factorization)(*inputs)
    after_forward = calls["n"]
    assert after_forward == (2 if factorization == "schur" else 1)  # chol(Q)+chol(S) or LDLᵀ
    grads = torch.autograd.grad((x.square().sum() + lam.sum()), inputs, create_graph=True)
    sum(g.square().sum() for g in grads).backward()  # double backward
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(Q, torch.ones_like(Q))
        tangent = forward_ad.unpack_dual(layer(factorization)(dual, c, A, b)[0]).tangent
    assert tangent is not None and bool(torch.isfinite(tangent).all())
    assert calls["n"] == after_forward + after_forward  # only the new forward call factored


def test_float32():
    Q, c, A, b = random_qp((4,), n=6, m=3, dtype=torch.float32)
    x, lam = layer()(Q, c, A, b)
    assert x.dtype == torch.float32
    x_ref, lam_ref = reference(Q, c, A, b)
    torch.testing.assert_close(x.double(), x_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lam.double(), lam_ref, rtol=1e-4, atol=1e-4)


def test_refinement_on_ill_conditioned_problem():
    # nearly square A and Q = XXᵀ from uniform X: badly conditioned KKT matrix
    g = torch.Generator().manual_seed(0)
    n, m = 60, 58
    X = torch.rand(n, n, generator=g, dtype=DT)
    Q, A = X @ X.T, torch.rand(m, n, generator=g, dtype=DT)
    c, b = torch.rand(n, generator=g, dtype=DT), torch.rand(m, generator=g, dtype=DT)
    scale = max(float(Q.abs().max()), 1.0) * 10
    res0 = kkt_residual(Q, c, A, b, *layer(refine=0)(Q, c, A, b))
    res2 = kkt_residual(Q, c, A, b, *layer(refine=2)(Q, c, A, b))
    assert res2 < 1e-11 * scale
    assert res2 <= res0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    Q, c, A, b = random_qp((3,), n=6, m=2)
    x, lam = layer()(*(t.cuda() for t in (Q, c, A, b)))
    x_ref, lam_ref = layer()(Q, c, A, b)
    torch.testing.assert_close(x.cpu(), x_ref)
    torch.testing.assert_close(lam.cpu(), lam_ref)
