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


def box_problem(n=4):
    """Bounds on both sides of ``x`` and of ``Mx`` (parameters on both sides), plus a
    constraint whose two canonical rows are not opposite (``|x₀ − p₁| ≤ 5``)."""
    x = cp.Variable(n)
    p, lo, hi = cp.Parameter(n, name="p"), cp.Parameter(n, name="lo"), cp.Parameter(n, name="hi")
    M, l, u = cp.Parameter((2, n), name="M"), cp.Parameter(2, name="l"), cp.Parameter(2, name="u")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - p) + 0.1 * cp.sum(x)),
                      [lo <= x, x <= hi, l <= M @ x, M @ x <= u, cp.abs(x[0] - p[1]) <= 5,
                       cp.sum(x) == 0.5])
    rng = np.random.default_rng(1)
    values = [np.array([[2.0, -2.0, 0.3, -0.1], [-2.0, 2.0, 0.5, 0.8]]),  # p: beyond both bounds
              -np.ones((2, n)), np.ones((2, n)), rng.standard_normal((2, 2, n)),
              np.full((2, 2), -0.5), np.full((2, 2), 0.4)]
    return prob, (p, lo, hi, M, l, u), x, values


def test_opposite_rows_pair_up_once_and_zero_rows_never():
    from implicit_layers.layers.qp.cvxpy import opposite_pairs

    rows = np.array([[1.0, -2.0], [0.0, 0.0], [-1.0, 2.0], [1.0, -2.0], [0.0, 0.0], [-1.0, -2.0]])
    assert opposite_pairs(rows) == ([0], [2])
    assert opposite_pairs(np.array([[-0.0, 1.0], [0.0, -1.0]])) == ([0], [1])


def test_two_sided_rows_match_cvxpy_and_the_one_sided_gradients():
    from implicit_layers.layers.qp.cvxpy import CvxpyQPLayer

    prob, params, x, values = box_problem()
    merged = il.QPLayer.from_cvxpy(prob, parameters=params, variables=[x])
    apart = CvxpyQPLayer(prob, params, [x], layer=il.QPLayer(), two_sided=False)
    assert merged.n_pairs == 4 + 2  # the bounds on x and on Mx; not the |x₀ − p₁| rows
    assert merged.G_map.shape[1] == apart.G_map.shape[1] - merged.n_pairs
    ts = [torch.tensor(v, requires_grad=True) for v in values]
    xs = merged(*ts)[0]
    for i in range(2):
        for par, v in zip(params, values, strict=True):
            par.value = v[i]
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
        np.testing.assert_allclose(xs[i].detach().numpy(), x.value, atol=1e-7)
    on_hi, on_lo = (xs - 1).abs() < 1e-9, (xs + 1).abs() < 1e-9
    assert on_hi.any() and on_lo.any()  # both sides of the box are active somewhere
    batched = torch.func.vmap(lambda *t: merged(*t)[0])(*(t.detach() for t in ts))
    torch.testing.assert_close(batched, xs.detach(), atol=1e-10, rtol=0)
    w = torch.tensor([1.0, -2.0, 0.5, 0.3], dtype=torch.float64)
    g_merged = torch.autograd.grad((xs * w).sum(), ts)
    g_apart = torch.autograd.grad((apart(*ts)[0] * w).sum(), ts)
    for a, b in zip(g_merged, g_apart, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    assert gradcheck(lambda *t: merged(*t)[0], [t.detach()[:1].requires_grad_() for t in ts],
                     atol=1e-6, rtol=1e-5, fast_mode=True)


def test_crossed_bounds_solve_the_one_sided_rows_like_cvxpy():
    from implicit_layers.layers.qp.cvxpy import CvxpyQPLayer

    prob, params, x, values = box_problem()
    values[1][1, 2], values[2][1, 2] = 0.5, -0.5  # lo > hi in the second sample: infeasible
    ts = [torch.tensor(v) for v in values]
    with pytest.raises(il.ConvergenceError, match="infeasible"):
        il.QPLayer.from_cvxpy(prob, parameters=params, variables=[x])(*ts)
    merged = il.QPLayer.from_cvxpy(prob, parameters=params, variables=[x], infeasible="closest")
    apart = CvxpyQPLayer(prob, params, [x], layer=il.QPLayer(infeasible="closest"), two_sided=False)
    torch.testing.assert_close(merged(*ts)[0], apart(*ts)[0], atol=1e-9, rtol=0)


def test_non_finite_parameters_are_reported_by_name():
    prob, params, x, values = box_problem()
    layer = il.QPLayer.from_cvxpy(prob, parameters=params, variables=[x])
    ts = [torch.tensor(v) for v in values]
    ts[2][0, 1] = float("nan")
    with pytest.raises(ValueError, match="parameter hi .*NaN"):
        layer(*ts)
    ts[2][0, 1] = float("inf")
    with pytest.raises(ValueError, match="parameter hi .*inf"):
        layer(*ts)
    ts[2][0, 1] = 1e20  # the documented "no bound"
    assert torch.isfinite(layer(*ts)[0]).all()
