"""EqualityQPLayer, OSQP backend: agreement with the dense backend, warm start, derivatives."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

import implicit_layers as il
from tests.layers.eq_qp_problems import DT, count_calls, random_qp

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def test_matches_dense_backend_batched_and_broadcast():
    Q, c, A, b = random_qp((3,), n=6, m=2)
    for args in ((Q, c, A, b), (Q[0], c, A[0], b)):
        x, lam = il.EqualityQPLayer("osqp")(*args)
        x_d, lam_d = il.EqualityQPLayer("dense")(*args)
        torch.testing.assert_close(x, x_d, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(lam, lam_d, rtol=1e-7, atol=1e-7)


def test_gradients_match_dense_backend():
    Q, c, A, b = random_qp((2,), n=5, m=2)
    grads = {}
    for name in ("osqp", "dense"):
        inputs = [t.clone().requires_grad_() for t in (Q, c, A, b)]
        x, lam = il.EqualityQPLayer(name)(*inputs)
        (x.square().sum() + lam.sum()).backward()
        grads[name] = [t.grad for t in inputs]
    for g_o, g_d in zip(grads["osqp"], grads["dense"], strict=True):
        torch.testing.assert_close(g_o, g_d, rtol=1e-6, atol=1e-6)


def test_gradgradcheck_and_forward_mode():
    Q, c, A, b = random_qp((), n=3, m=1)
    inputs = [t.clone().requires_grad_() for t in (Q, c, A, b)]
    layer = il.EqualityQPLayer("osqp")
    # OSQP's forward is exact to ~1e-10 here; the derivative solves are exact
    assert torch.autograd.gradgradcheck(layer, inputs, atol=1e-5, rtol=1e-4)
    tangent = torch.ones_like(c)
    with forward_ad.dual_level():
        x, _ = layer(Q, forward_ad.make_dual(c, tangent), A, b)
        x_dot = forward_ad.unpack_dual(x).tangent
    eps = 1e-5
    fd = (il.EqualityQPLayer("dense")(Q, c + eps * tangent, A, b)[0]
          - il.EqualityQPLayer("dense")(Q, c - eps * tangent, A, b)[0]) / (2 * eps)
    torch.testing.assert_close(x_dot, fd, rtol=1e-6, atol=1e-7)


def test_warm_start_reduces_iterations():
    Q, c, A, b = random_qp((4,), n=20, m=8)
    layer = il.EqualityQPLayer(il.OSQPBackend(eps_abs=1e-8, eps_rel=1e-8, polishing=False))
    layer(Q, c, A, b)
    cold = layer.stats.forward.iterations.clone()
    layer(Q, c + 1e-6, A, b)  # a nearby problem, started from the previous solution
    warm = layer.stats.forward.iterations
    assert bool((warm < cold).all())
    assert layer.stats.forward.all_converged


def test_backward_reuses_the_forward_factorization(monkeypatch):
    calls = count_calls(monkeypatch, ("cholesky_ex", "ldl_factor_ex"))
    Q, c, A, b = random_qp((2,), n=5, m=2)
    x, lam = il.EqualityQPLayer("osqp")(Q, c, A, b)  # no derivative taken: no factorization
    assert calls["n"] == 0
    inputs = [t.clone().requires_grad_() for t in (Q, c, A, b)]
    x, lam = il.EqualityQPLayer("osqp")(*inputs)
    grads = torch.autograd.grad(x.sum() + lam.sum(), inputs, create_graph=True)
    assert calls["n"] == 2  # Cholesky of Q and of the Schur complement, once
    sum(g.sum() for g in grads).backward()
    assert calls["n"] == 2
    assert isinstance(il.EqualityQPLayer("osqp").resolve(Q, A), il.OSQPBackend)
    assert DT == x.dtype
