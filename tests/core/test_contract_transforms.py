"""Observation 5 of issue 13: torch.func transforms compose with every layer.

``vmap(jacrev(f))``, ``vmap(jacfwd(f))`` and ``vmap(hessian(f))`` of each layer (with respect to
all of its inputs) equal the per-sample loops; ``jacrev`` equals ``jacfwd`` (the backward and
the tangent path are independent computations). Before the fix, ``vmap`` of a Jacobian mixed
the cotangent dim with the vmapped batch dim (silently wrong Jacobians, or a broadcasting
error), least squares escaped a transform level, and the QP's active-set masks belonged to
the physical batch instead of each sample.
"""

import pytest
import torch
from torch.func import hessian, jacfwd, jacrev, vmap

import implicit_layers as il
from implicit_layers import functional as F
from tests.core.layer_zoo import CASES, DT
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)

B = 2


def _per_sample(case):
    model = case.make()
    return lambda *xs: model(*xs)


def _stack(outs):
    """Stack per-sample results (tensors, or nested tuples of them) along a new dim 0."""
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs)
    return tuple(_stack([o[k] for o in outs]) for k in range(len(outs[0])))


def _loop(T, xs):
    return _stack([T(*(x[i] for x in xs)) for i in range(B)])


@pytest.mark.parametrize("transform", [jacrev, jacfwd, hessian], ids=lambda t: t.__name__)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_vmap_of_jacobians_equals_the_loop(case, transform):
    f = _per_sample(case)
    xs = case.sample((B,))
    argnums = tuple(range(len(xs))) if transform is not hessian else (0,)
    T = transform(f, argnums=argnums)
    torch.testing.assert_close(vmap(T)(*xs), _loop(T, xs), atol=1e-9, rtol=1e-7)
    if transform is jacfwd:
        torch.testing.assert_close(_loop(T, xs), _loop(jacrev(f, argnums=argnums), xs),
                                   atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("transform", [jacrev, jacfwd], ids=lambda t: t.__name__)
def test_vmap_of_jacobian_of_root_find_issue_example(transform):
    """The issue's cubic ``y³ + p y − q`` with p and q of shape (4, 3): ∂y/∂q = diag(1/(3y² + p))."""
    gen = torch.Generator().manual_seed(1)
    p = 1 + torch.rand(4, 3, generator=gen, dtype=DT)
    q = torch.randn(4, 3, generator=gen, dtype=DT)
    solve = lambda p, q: F.root_find(lambda x, y: y ** 3 + x[0] * y - x[1], (p, q),  # noqa: E731
                                     torch.zeros_like(q))
    J = vmap(transform(solve, argnums=1))(p, q)
    y = solve(p, q)
    torch.testing.assert_close(J, torch.diag_embed(1 / (3 * y ** 2 + p)), atol=1e-12, rtol=0)


def test_vmap_over_qp_with_optional_arguments_left_as_none():
    gen = torch.Generator().manual_seed(2)
    Q = torch.eye(3, dtype=DT) * 2
    c = torch.randn(4, 3, generator=gen, dtype=DT)
    G, h = torch.eye(3, dtype=DT), 0.1 * torch.ones(3, dtype=DT)
    x_map = vmap(lambda c: F.qp(Q, c, None, None, G, h)[0])(c)
    torch.testing.assert_close(x_map, F.qp(Q, c, None, None, G, h)[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(x_map, torch.clamp(-c / 2, max=0.1), atol=1e-8, rtol=0)
    layer = il.QPLayer()
    lam_mu = vmap(lambda c: torch.cat(layer(Q, c, None, None, G, h, None)[1:], -1))(c)
    assert lam_mu.shape == (4, 3)  # λ empty, μ per row
    torch.testing.assert_close(lam_mu, torch.cat(layer(Q, c, None, None, G, h, None)[1:], -1),
                               atol=1e-10, rtol=0)
    J = vmap(jacrev(lambda c: F.qp(Q, c, None, None, G, h)[0]))(c)
    free = (-c / 2 < 0.1).to(DT)  # ∂x/∂c = −½ on the free coordinates, 0 where clamped
    torch.testing.assert_close(J, torch.diag_embed(-free / 2), atol=1e-8, rtol=0)
