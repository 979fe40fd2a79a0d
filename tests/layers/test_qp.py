"""QPLayer with the interior-point solver: values, derivatives of every order, transforms."""

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import implicit_layers as il
from implicit_layers import functional as F
from implicit_layers.testing.qp_problems import strictly_complementary_qp
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)


def cvxpy_solve(Q, c, A, b, G, h):
    Q, c, A, b, G, h = (t.detach().double().numpy() for t in (Q, c, A, b, G, h))
    x = cp.Variable(c.shape[-1])
    cons = [G @ x <= h] + ([A @ x == b] if A.shape[0] else [])
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(Q)) + c @ x), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    lam = cons[1].dual_value if A.shape[0] else np.zeros(0)
    return x.value, lam, cons[0].dual_value


@pytest.mark.parametrize("p", [0, 2])
def test_matches_cvxpy_and_known_solution(p):
    (Q, c, A, b, G, h), (xs, ls, ms) = strictly_complementary_qp(batch=(3,), n=6, m=8, p=p, seed=1)
    x, lam, mu = il.QPLayer()(Q, c, A if p else None, b if p else None, G, h)
    torch.testing.assert_close(x, xs, atol=1e-7, rtol=0)
    torch.testing.assert_close(mu, ms, atol=1e-6, rtol=0)
    torch.testing.assert_close(lam, ls, atol=1e-6, rtol=0)
    for i in range(3):
        xr, lr, mr = cvxpy_solve(Q[i], c[i], A[i], b[i], G[i], h[i])
        np.testing.assert_allclose(x[i].numpy(), xr, atol=1e-6)
        np.testing.assert_allclose(mu[i].numpy(), mr, atol=1e-6)
        np.testing.assert_allclose(lam[i].numpy(), lr, atol=1e-6)


def test_linear_program_and_singular_psd_Q():
    n = 4
    G = torch.cat([torch.eye(n), -torch.eye(n)]).double()
    h = torch.ones(2 * n, dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5, -0.1], dtype=torch.float64)
    x, _, _ = F.qp(torch.zeros(n, n, dtype=torch.float64), c, None, None, G, h)
    torch.testing.assert_close(x, -torch.sign(c), atol=1e-7, rtol=0)  # box LP: a vertex
    (Q, c, A, b, G, h), (xs, _, _) = strictly_complementary_qp(n=5, m=6, psd_rank=2, seed=3)
    x, _, _ = F.qp(Q, c, A, b, G, h)
    torch.testing.assert_close(x, xs, atol=1e-7, rtol=0)


def test_gradcheck_all_inputs_and_outputs():
    (Q, c, A, b, G, h), _ = strictly_complementary_qp(batch=(2,), n=3, m=4, p=1, seed=2)
    args = [t.clone().requires_grad_() for t in (Q, c, A, b, G, h)]
    assert gradcheck(lambda *a: F.qp(*a), args, atol=1e-6, rtol=1e-5)


def test_gradgradcheck_and_forward_mode():
    (Q, c, A, b, G, h), _ = strictly_complementary_qp(batch=(1,), n=3, m=4, p=1, seed=4)
    args = [t.clone().requires_grad_() for t in (Q, c, A, b, G, h)]
    # finite differences of gradients need a tight forward solve
    fn = lambda *a: F.qp(*a, solver=il.InteriorPoint(tol=1e-13))  # noqa: E731
    assert gradgradcheck(fn, args, atol=1e-5, rtol=1e-3, fast_mode=True)
    assert gradcheck(fn, args, atol=1e-6, rtol=1e-5, check_forward_ad=True,
                     check_backward_ad=False, check_undefined_grad=False)


def test_jvp_matches_finite_differences_and_jacrev():
    (Q, c, A, b, G, h), _ = strictly_complementary_qp(batch=(), n=4, m=5, p=1, seed=5)
    dh, dc = torch.randn_like(h), torch.randn_like(c)
    f = lambda c_, h_: F.qp(Q, c_, A, b, G, h_)[0]  # noqa: E731
    _, xdot = torch.func.jvp(f, (c, h), (dc, dh))
    eps = 1e-6
    fd = (f(c + eps * dc, h + eps * dh) - f(c - eps * dc, h - eps * dh)) / (2 * eps)
    torch.testing.assert_close(xdot, fd, atol=1e-6, rtol=1e-5)
    J_fwd = torch.func.jacfwd(f, argnums=1)(c, h)
    J_rev = torch.func.jacrev(f, argnums=1)(c, h)
    torch.testing.assert_close(J_fwd, J_rev, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(J_fwd @ dh + torch.func.jacrev(f)(c, h) @ dc, xdot, atol=1e-9, rtol=1e-9)


def test_vmap_equals_batched_call_and_broadcasting_sums_grads():
    (Q, c, A, b, G, h), _ = strictly_complementary_qp(batch=(3,), n=4, m=5, p=1, seed=6)
    batched = F.qp(Q, c, A, b, G, h)
    mapped = torch.func.vmap(lambda *a: F.qp(*a))(Q, c, A, b, G, h)
    for u, v in zip(batched, mapped, strict=True):
        torch.testing.assert_close(u, v)
    # one shared Q and G for the batch: their gradients are the sums of per-sample gradients
    Qs, Gs = Q[0].clone().requires_grad_(), G[0].clone().requires_grad_()
    hs = (G[0] @ torch.linalg.solve(Q[0], -c.mT)).mT.abs() + 0.5  # feasible for every sample
    F.qp(Qs, c, None, None, Gs, hs)[0].sum().backward()
    per = [torch.autograd.grad(F.qp(Qs, c[i], None, None, Gs, hs[i])[0].sum(), (Qs, Gs)) for i in range(3)]
    torch.testing.assert_close(Qs.grad, sum(p[0] for p in per))
    torch.testing.assert_close(Gs.grad, sum(p[1] for p in per))
    torch.testing.assert_close(Qs.grad, Qs.grad.mT)  # symmetric input, symmetric gradient


def test_float32_and_per_sample_iterations():
    (Q, c, A, b, G, h), (xs, _, _) = strictly_complementary_qp(batch=(4,), n=5, m=6, p=1, seed=7)
    Q[0] *= 100  # a harder sample must not change the others' iteration counts
    layer = il.QPLayer()
    x, _, _ = layer(*(t.float() for t in (Q, c, A, b, G, h)))
    assert x.dtype == torch.float32
    torch.testing.assert_close(x[1:], xs[1:].float(), atol=2e-3, rtol=0)
    x64, _, _ = layer(Q, c, A, b, G, h)
    torch.testing.assert_close(x[0], x64[0].float(), atol=2e-3, rtol=0)
    its = layer.stats.forward.iterations
    assert its.shape == (4,) and bool(layer.stats.forward.converged.all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(Q=torch.ones(3, 2)), "Q must be square"),
        (dict(c=torch.ones(3)), "c must have shape"),
        (dict(G=torch.ones(2, 3)), "G must have 2 columns"),
        (dict(h=torch.ones(3)), "h must have shape"),
        (dict(A=torch.ones(1, 2), b=None), "A and b must be given together"),
        (dict(c=torch.tensor([1.0, float("nan")], dtype=torch.float64)), "c contains NaN"),
        (dict(h=torch.ones(2, dtype=torch.float32)), "dtype"),
        (dict(Q=torch.eye(2, dtype=torch.int64)), "floating dtype"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(Q=torch.eye(2), c=torch.ones(2), A=None, b=None, G=torch.eye(2), h=torch.ones(2))
    args = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in args.items()}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        il.QPLayer()(**args)


def test_bad_solver_options():
    with pytest.raises(ValueError, match="max_iter"):
        il.InteriorPoint(max_iter=0)
    with pytest.raises(ValueError, match="on_failure"):
        il.QPLayer(on_failure="ignore")
