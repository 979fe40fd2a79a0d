"""Issue 12, item 6: an LP zoo (Q = 0) against scipy.optimize.linprog (HiGHS).

Bounded random LPs, LPs whose optimal vertex is degenerate (more active constraints than
variables), box LPs, box LPs with a non-unique solution, and the grid shortest-path LP with
its redundant conservation row kept (dependent equality rows). Every sample is SOLVED with
the optimal objective to 1e-7·(1 + |f*|); where the solution is unique, x matches it; where
the derivative system is singular the sample is flagged degenerate with a finite gradient.
"""

import pytest
import torch

import implicit_layers as il
from implicit_layers.testing.lp_problems import grid_paths, shortest_path_lp
from tests.layers.qp_backends import make
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)
from tests.layers.qp_references import linprog_objective

LP_BACKENDS = ["ip-primal", "osqp"]  # the dual order needs a positive definite Q: LPs fall back
f64 = dict(dtype=torch.float64)


def box_rows(B, n):
    """``−1 ≤ x ≤ 1`` as two-sided rows of ``G = I``."""
    return torch.eye(n, **f64).expand(B, n, n), -torch.ones(B, n, **f64), torch.ones(B, n, **f64)


def random_bounded(gen, B=10, n=10, m=10):
    """Random constraints through a box, feasible at a point inside it; x* generically unique."""
    Gb, lb, ub = box_rows(B, n)
    G = torch.randn(B, m, n, generator=gen, **f64)
    x0 = 0.5 * torch.rand(B, n, generator=gen, **f64) - 0.25
    h = (G @ x0[..., None])[..., 0] + torch.rand(B, m, generator=gen, **f64)
    c = torch.randn(B, n, generator=gen, **f64)
    inf = torch.full((B, m), -float("inf"), **f64)
    return c, torch.cat([G, Gb], 1), torch.cat([inf, lb], 1), torch.cat([h, ub], 1), None


def degenerate_vertex(gen, B=10, n=6, extra=3):
    """``n + extra`` constraints all tight at a vertex v inside the box; ``c`` strictly inside
    the cone of the first n normals, so v is the unique optimum, with ``extra`` weakly active
    constraints (a degenerate vertex)."""
    Gb, lb, ub = box_rows(B, n)
    v = torch.rand(B, n, generator=gen, **f64) - 0.5
    G = torch.randn(B, n + extra, n, generator=gen, **f64)
    h = (G @ v[..., None])[..., 0]
    mu = 0.5 + torch.rand(B, n, generator=gen, **f64)
    c = -(G[:, :n].mT @ mu[..., None])[..., 0]
    inf = torch.full((B, n + extra), -float("inf"), **f64)
    return c, torch.cat([G, Gb], 1), torch.cat([inf, lb], 1), torch.cat([h, ub], 1), v


def box(gen, B=10, n=8, zero_costs=0):
    """``min cᵀx s.t. l ≤ x ≤ u``: x = l where c > 0, u where c < 0; ``zero_costs`` entries
    of c set to 0 make x non-unique (any value in [l, u] there)."""
    c = torch.randn(B, n, generator=gen, **f64)
    c[:, :zero_costs] = 0.0
    lo = -torch.rand(B, n, generator=gen, **f64)
    up = torch.rand(B, n, generator=gen, **f64)
    x = torch.where(c > 0, lo, up) if not zero_costs else None
    return c, torch.eye(n, **f64).expand(B, n, n), lo, up, x


FAMILIES = {
    "random-bounded": (random_bounded, False),  # (generator, always degenerate)
    "degenerate-vertex": (degenerate_vertex, True),
    "box": (box, False),
    "box-non-unique": (lambda gen: box(gen, zero_costs=2), True),
}


def objective_matches(c, x, A, b, G, lower, upper):
    for i in range(c.shape[0]):
        pick = lambda t, i=i: None if t is None else t[i].numpy()  # noqa: E731
        f = linprog_objective(c[i].numpy(), pick(A), pick(b), G[i].numpy(), lower[i].numpy(),
                              upper[i].numpy())
        assert abs(float(c[i] @ x[i]) - f) <= 1e-7 * (1 + abs(f)), (i, float(c[i] @ x[i]), f)


@pytest.mark.parametrize("backend", LP_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lp_zoo_against_highs(backend, family):
    make_lp, degenerate = FAMILIES[family]
    c, G, lower, upper, x_known = make_lp(torch.Generator().manual_seed(len(family)))
    B, n = c.shape
    layer = make(backend)
    args = [t.clone().requires_grad_() for t in (c, G, upper, lower)]
    x, _, _ = layer(torch.zeros(n, n, **f64), args[0], None, None, args[1], args[2], lower=args[3])
    assert bool((layer.stats.forward.extra["status"] == il.QPStatus.SOLVED).all())
    objective_matches(c, x.detach(), None, None, G, lower, upper)
    if x_known is not None:
        torch.testing.assert_close(x.detach(), x_known, atol=1e-7, rtol=0)
    grads = torch.autograd.grad(x.sum(), args)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    flagged = layer.stats.backward.extra["degenerate"]
    if degenerate:
        assert bool(flagged.all()), flagged


@pytest.mark.parametrize("backend", LP_BACKENDS)
def test_shortest_path_with_dependent_equality_rows(backend):
    A, b, G, h = shortest_path_lp((5, 5), drop_redundant=False)
    gen = torch.Generator().manual_seed(0)
    c = (0.1 + torch.rand(16, A.shape[-1], generator=gen, **f64)).requires_grad_()
    layer = make(backend)
    x, _, _ = layer(torch.zeros(40, 40, **f64), c, A, b, G, h)
    assert bool((layer.stats.forward.extra["status"] == il.QPStatus.SOLVED).all())
    cd = c.detach()
    objective_matches(cd, x.detach(), A.expand(16, -1, -1), b.expand(16, -1), G.expand(16, -1, -1),
                      torch.full((16, 40), -float("inf"), **f64), h.expand(16, -1))
    paths = grid_paths((5, 5))
    best = paths[(cd @ paths.mT).argmin(-1)]  # brute force over the 70 paths: x* is a path
    torch.testing.assert_close(x.detach(), best, atol=1e-7, rtol=0)
    (g,) = torch.autograd.grad((x * torch.randn(x.shape, generator=gen, **f64)).sum(), c)
    assert bool(torch.isfinite(g).all())
    assert bool(layer.stats.backward.extra["degenerate"].all())  # dependent rows: K singular
