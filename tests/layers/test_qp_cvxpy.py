"""QPLayer.from_cvxpy: the canonical QP of a parametrized cvxpy problem, differentiably."""

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import implicit_layers as il
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)


def problem(n=3):
    rng = np.random.default_rng(0)
    x, Y = cp.Variable(n), cp.Variable((2, 2))
    p, M, q = cp.Parameter(n), cp.Parameter((2, n)), cp.Parameter(2)
    S = rng.standard_normal((n, n))
    S = S @ S.T + np.eye(n)
    objective = 0.5 * cp.quad_form(x, S) + p @ x + cp.sum_squares(Y) - cp.trace(Y)
    prob = cp.Problem(cp.Minimize(objective), [M @ x <= q, cp.sum(x) == 1, Y[0, 1] >= 0.3])
    values = (rng.standard_normal(n), rng.standard_normal((2, n)), rng.random(2) + 0.1)
    return prob, (p, M, q), (x, Y), values


def test_matches_cvxpy_solution_batched():
    prob, params, (x, Y), values = problem()
    layer = il.QPLayer.from_cvxpy(prob, parameters=params, variables=[x, Y])
    shifts = [0.0, 0.3]
    xs, Ys = layer(*(torch.tensor(np.stack([v + s for s in shifts])) for v in values))
    assert xs.shape == (2, 3) and Ys.shape == (2, 2, 2)
    for i, s in enumerate(shifts):
        for par, v in zip(params, values, strict=True):
            par.value = v + s
        prob.solve(solver=cp.CLARABEL)
        np.testing.assert_allclose(xs[i].numpy(), x.value, atol=1e-6)
        np.testing.assert_allclose(Ys[i].numpy(), Y.value, atol=1e-6)


def test_gradients_match_cvxpylayers_and_gradcheck():
    cvxpylayers = pytest.importorskip("cvxpylayers.torch")
    prob, params, (x, Y), values = problem()
    ours = il.QPLayer.from_cvxpy(prob, parameters=params, variables=[x])
    theirs = cvxpylayers.CvxpyLayer(prob, parameters=list(params), variables=[x])
    ts = [torch.tensor(v, requires_grad=True) for v in values]
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g_ours = torch.autograd.grad((ours(*ts)[0] * w).sum(), ts)
    g_theirs = torch.autograd.grad((theirs(*ts, solver_args={"eps": 1e-10})[0] * w).sum(), ts)
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert gradcheck(lambda *t: ours(*t)[0], ts, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_rejects_non_qps_and_bad_arguments():
    x, p = cp.Variable(2), cp.Parameter(2)
    socp = cp.Problem(cp.Minimize(p @ x), [cp.norm(x, 2) <= 1])
    with pytest.raises(ValueError, match="not a QP"):
        il.QPLayer.from_cvxpy(socp, parameters=[p], variables=[x])
    not_dpp = cp.Problem(cp.Minimize(cp.sum_squares(x)), [p[0] * p[1] * x >= 1])
    with pytest.raises(ValueError, match="not DPP"):
        il.QPLayer.from_cvxpy(not_dpp, parameters=[p], variables=[x])
    qp = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [x >= 0])
    with pytest.raises(ValueError, match="every parameter"):
        il.QPLayer.from_cvxpy(qp, parameters=[], variables=[x])
    with pytest.raises(ValueError, match="variables must be"):
        il.QPLayer.from_cvxpy(qp, parameters=[p], variables=[cp.Variable(2)])
    layer = il.QPLayer.from_cvxpy(qp, parameters=[p], variables=[x])
    with pytest.raises(ValueError, match="must have shape"):
        layer(torch.ones(3, dtype=torch.float64))
