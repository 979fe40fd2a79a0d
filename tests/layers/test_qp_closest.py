"""Issue 14, item 2: ``QPLayer(infeasible="closest")`` solves an infeasible QP as proxsuite's
closest feasible QP.

Checked against the definition computed with Clarabel (the least-norm shift of each
constraint side, then the shifted QP; tests/layers/qp_references.py), against proxsuite's
dense solver where it reports PROXQP_SOLVED_CLOSEST_PRIMAL_FEASIBLE (tight settings: its
torch QPFunction at defaults was found unconverged on some samples), with the status
``CLOSEST_FEASIBLE`` and the shift in ``stats.forward.extra["shift"]``; a batch mixing
feasible and infeasible samples solves the feasible ones as if alone; gradients and JVPs
match central differences of the layer's own solution map.
"""

import numpy as np
import pytest
import torch

import implicit_layers as il
from tests.layers.qp_backends import BACKENDS, make
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)
from tests.layers.qp_references import closest_feasible_reference, random_feasible_qps

f64 = dict(dtype=torch.float64)
INF = float("inf")


def infeasible_qps(gen, B, n, m, p, gap=1.0):
    """``(Q, c, A, b, G, lower, upper)``, infeasible by construction: sample kinds cycle
    through a conflicting inequality pair (``g x ≤ t`` and ``g x ≥ t + gap``, one-sided rows),
    a conflicting equality pair (``a x = β`` and ``a x = β + gap``), and both; the other rows
    are two-sided and hold at a common point."""
    r = lambda *s: torch.randn(B, *s, generator=gen, **f64)  # noqa: E731
    M = r(n, n)
    Q = M @ M.mT / n + 0.1 * torch.eye(n, **f64)
    A, G, x0, c = r(p, n), r(m, n), r(n), r(n)
    b, Gx = (A @ x0[..., None])[..., 0], (G @ x0[..., None])[..., 0]
    upper = Gx + torch.rand(B, m, generator=gen, **f64)
    lower = Gx - torch.rand(B, m, generator=gen, **f64)
    kind = torch.arange(B) % 3
    ineq, eq = kind != 1, kind != 0
    G[:, 1] = G[:, 0]
    upper[:, 0] = torch.where(ineq, Gx[:, 0], upper[:, 0])
    lower[:, 0] = torch.where(ineq, -INF, lower[:, 0])
    lower[:, 1] = torch.where(ineq, Gx[:, 0] + gap, lower[:, 1])
    upper[:, 1] = torch.where(ineq, INF, upper[:, 1])
    A[:, 1] = torch.where(eq[:, None], A[:, 0], A[:, 1])
    b[:, 1] = torch.where(eq, b[:, 0] + gap, b[:, 1])
    return Q, c, A, b, G, lower, upper


def proxsuite_closest(Q, c, A, b, G, lower, upper):
    """proxsuite's dense solver in closest-feasible mode: ``(x, solved_closest)``."""
    from proxsuite import proxqp

    n, p, m = c.shape[0], A.shape[0], G.shape[0]
    qp = proxqp.dense.QP(n, p, m)
    qp.settings.primal_infeasibility_solving = True
    qp.settings.eps_abs, qp.settings.max_iter, qp.settings.verbose = 1e-10, 10000, False
    qp.init(Q, c, A, b, G, np.maximum(lower, -1e20), np.minimum(upper, 1e20))
    qp.solve()
    closest = qp.results.info.status == proxqp.PROXQP_SOLVED_CLOSEST_PRIMAL_FEASIBLE
    return np.asarray(qp.results.x), closest


@pytest.fixture(scope="module")
def problems():
    data = infeasible_qps(torch.Generator().manual_seed(0), B=9, n=6, m=5, p=2)
    refs = [closest_feasible_reference(*(t[i].numpy() for t in data)) for i in range(9)]
    prox = [proxsuite_closest(*(t[i].numpy() for t in data)) for i in range(9)]
    return data, refs, prox


@pytest.mark.parametrize("backend", BACKENDS)
def test_closest_feasible_matches_the_definition_and_proxsuite(backend, problems):
    (Q, c, A, b, G, lower, upper), refs, prox = problems
    layer = make(backend, infeasible="closest")
    x, _, _ = layer(Q, c, A, b, G, upper, lower=lower)
    stats = layer.stats.forward
    assert stats.extra["status"].tolist() == [il.QPStatus.CLOSEST_FEASIBLE] * 9
    x_ref = torch.as_tensor(np.stack([r[0] for r in refs]))
    shift_ref = torch.as_tensor(np.stack([r[1] for r in refs]))
    tol = 1e-7 * (1 + x_ref.abs().amax(-1, keepdim=True))
    assert bool(((x - x_ref).abs() <= tol).all()), (x - x_ref).abs().max()
    torch.testing.assert_close(stats.extra["shift"], shift_ref, atol=1e-7, rtol=0)
    closest = [i for i, (_, ok) in enumerate(prox) if ok]
    assert len(closest) >= 3  # (its other samples end MAX_ITER or PRIMAL_INFEASIBLE)
    x_prox = torch.as_tensor(np.stack([prox[i][0] for i in closest]))
    torch.testing.assert_close(x[closest], x_prox, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feasible_samples_of_a_mixed_batch_are_solved_as_if_alone(backend, problems):
    bad = problems[0]
    good = random_feasible_qps(torch.Generator().manual_seed(1), 9, 6, 5, 2, singular=False,
                               two_sided=True)
    order = torch.arange(18).reshape(2, 9).mT.flatten()  # good, bad, good, bad, ...
    mixed = [torch.cat([g, b_]).index_select(0, order) for g, b_ in zip(good, bad, strict=True)]
    w = torch.randn(18, 6, generator=torch.Generator().manual_seed(2), **f64)
    layer = make(backend, infeasible="closest")

    def solve(Q, c, A, b, G, lower, upper, w):
        args = [t.clone().requires_grad_() for t in (c, b, upper, lower)]
        x, _, _ = layer(Q, args[0], A, args[1], G, args[2], lower=args[3])
        return x.detach(), torch.autograd.grad((x * w).sum(), args), layer.stats.forward

    x_mix, g_mix, stats = solve(*mixed, w)
    x_alone, g_alone, alone = solve(*good, w[0::2])
    status = stats.extra["status"]
    assert status[0::2].tolist() == [il.QPStatus.SOLVED] * 9
    assert status[1::2].tolist() == [il.QPStatus.CLOSEST_FEASIBLE] * 9
    assert float(stats.extra["shift"][0::2].abs().max()) == 0.0
    torch.testing.assert_close(x_mix[0::2], x_alone, atol=1e-10, rtol=0)  # up to round-off
    for gm, ga in zip(g_mix, g_alone, strict=True):
        torch.testing.assert_close(gm[0::2], ga, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closest_gradients_and_tangents_match_central_differences(backend, problems):
    (Q, c, A, b, G, lower, upper), _, _ = problems
    data = [t[:3].clone() for t in (Q, c, A, b, G, upper, lower)]  # one sample of each kind
    layer = make(backend, infeasible="closest")
    gen = torch.Generator().manual_seed(3)
    dirs = [torch.randn(t.shape, generator=gen, **f64) for t in data]
    dirs[0] = dirs[0] + dirs[0].mT
    for d, t in zip(dirs[5:], data[5:], strict=True):
        d[torch.isinf(t)] = 0.0  # absent bounds stay absent
    # the conflicting rows stay parallel: tilting one makes the QP feasible (far away), and
    # the least-norm shift jumps to 0 there: the map is differentiable only along the others
    dirs[2][:, 1], dirs[4][:, 1] = dirs[2][:, 0], dirs[4][:, 0]
    w = torch.randn(3, 6, generator=gen, **f64)

    def f(*a):
        return layer(*a[:6], lower=a[6])[0]

    args = [t.clone().requires_grad_() for t in data]
    grads = torch.autograd.grad((f(*args) * w).sum(), args)
    assert layer.stats.forward.extra["status"].tolist() == [il.QPStatus.CLOSEST_FEASIBLE] * 3
    eps = 1e-5  # the phase-one QP's x is not unique: its shift is good to ~1e-9, not 1e-12
    plus = f(*(t + eps * d for t, d in zip(data, dirs, strict=True)))
    minus = f(*(t - eps * d for t, d in zip(data, dirs, strict=True)))
    fd = (plus - minus) / (2 * eps)
    reverse = sum((g * d).flatten(1).sum(1) for g, d in zip(grads, dirs, strict=True))
    torch.testing.assert_close(reverse, (fd * w).sum(-1), atol=1e-7, rtol=1e-5)
    _, forward = torch.func.jvp(f, tuple(data), tuple(dirs))
    torch.testing.assert_close((forward * w).sum(-1), (fd * w).sum(-1), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close((forward * w).sum(-1), reverse, atol=1e-9, rtol=1e-8)
