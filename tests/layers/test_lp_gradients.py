"""SmoothedLP and PerturbedLP against their defining formulas.

Independent references: the Euclidean projection onto the simplex (sort-based, Duchi et al.
2008) and cvxpy for the smoothed LP; brute force over every path of the grid for the LP
solutions inside the perturbed estimator; the Gaussian closed form of a two-vertex LP for
the estimator's expectation.
"""

import math

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import implicit_layers as il
from implicit_layers.testing.lp_problems import grid_paths, shortest_path_lp
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)

D = torch.float64
GRID = (3, 4)


def simplex(n):
    """``1ᵀx = 1, x ≥ 0`` as ``(A, b, G, h)``."""
    return torch.ones(1, n, dtype=D), torch.ones(1, dtype=D), -torch.eye(n, dtype=D), torch.zeros(n, dtype=D)


def project_simplex(v):
    """Euclidean projection of each row of ``v`` onto the probability simplex (sort-based)."""
    u = torch.sort(v, dim=-1, descending=True).values
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    css = u.cumsum(-1) - 1
    rho = ((u - css / k) > 0).sum(-1, keepdim=True)
    theta = css.gather(-1, rho - 1) / rho
    return (v - theta).clamp_min(0)


def brute_force_lp(c, paths):
    """The cheapest path for each cost row (LP solution of the grid shortest path)."""
    return paths[(c @ paths.T).argmin(-1)]


# ---------------------------------------------------------------- SmoothedLP


@pytest.mark.parametrize("gamma", [0.3, 2.0])
def test_smoothed_lp_on_the_simplex_is_the_projection_of_minus_c_over_gamma(gamma):
    # argmin cᵀx + ½γ‖x‖² over the simplex = Π_simplex(−c/γ), and so is its Jacobian
    c = torch.randn(6, 5, dtype=D, generator=torch.Generator().manual_seed(0), requires_grad=True)
    layer = il.SmoothedLP(gamma)
    x = layer(c, *simplex(5))
    ref = project_simplex(-c / gamma)
    torch.testing.assert_close(x, ref, atol=1e-8, rtol=0)
    x_bar = torch.randn(6, 5, dtype=D)
    (g,) = torch.autograd.grad((x * x_bar).sum(), c)
    (g_ref,) = torch.autograd.grad((ref * x_bar).sum(), c)
    torch.testing.assert_close(g, g_ref, atol=1e-7, rtol=0)
    assert bool(layer.qp.stats.forward.converged.all())


def test_smoothed_lp_matches_cvxpy_on_the_shortest_path_polytope():
    A, b, G, h = shortest_path_lp(GRID)
    c = torch.rand(3, A.shape[1], dtype=D, generator=torch.Generator().manual_seed(1))
    gamma = 0.5
    x = il.SmoothedLP(gamma)(c, A, b, G, h)
    for i in range(3):
        v = cp.Variable(A.shape[1])
        cp.Problem(cp.Minimize(c[i].numpy() @ v + gamma / 2 * cp.sum_squares(v)),
                   [A.numpy() @ v == b.numpy(), v >= 0]).solve(solver=cp.CLARABEL, tol_gap_abs=1e-12,
                                                               tol_gap_rel=1e-12, tol_feas=1e-12)
        np.testing.assert_allclose(x[i].numpy(), v.value, atol=1e-6)


def test_smoothed_lp_is_scale_covariant_and_tends_to_the_lp_vertex():
    A, b, G, h = shortest_path_lp(GRID)
    c = torch.rand(4, A.shape[1], dtype=D, generator=torch.Generator().manual_seed(2)) + 0.1
    torch.testing.assert_close(il.SmoothedLP(0.5)(c, A, b, G, h), il.SmoothedLP(1.0)(2 * c, A, b, G, h),
                               atol=1e-8, rtol=0)
    x = il.SmoothedLP(1e-4, solver=il.InteriorPoint(max_iter=100))(c, A, b, G, h)
    torch.testing.assert_close(x, brute_force_lp(c, grid_paths(GRID)), atol=1e-6, rtol=0)


def test_smoothed_lp_gradients_in_float64():
    c = torch.tensor([[0.3, 0.1, 0.5, 0.2], [0.0, 0.4, 0.1, 0.2]], dtype=D, requires_grad=True)
    A, b, G, h = simplex(4)
    h = h.clone().requires_grad_()
    f = lambda c, h: il.SmoothedLP(1.0)(c, A, b, G, h)  # noqa: E731
    assert gradcheck(f, (c, h), atol=1e-6)
    assert gradgradcheck(f, (c, h), atol=1e-5)
    # forward mode against central differences
    dc = torch.randn_like(c)
    _, tangent = torch.func.jvp(lambda c: f(c, h.detach()), (c.detach(),), (dc,))
    eps = 1e-6
    fd = (f(c.detach() + eps * dc, h.detach()) - f(c.detach() - eps * dc, h.detach())) / (2 * eps)
    torch.testing.assert_close(tangent, fd, atol=1e-6, rtol=0)


def test_smoothed_lp_vmap_and_batch_equal_per_sample_calls():
    A, b, G, h = shortest_path_lp(GRID)
    c = torch.rand(5, A.shape[1], dtype=D, generator=torch.Generator().manual_seed(3))
    layer = il.SmoothedLP(0.7)
    batched = layer(c, A, b, G, h)
    per_sample = torch.stack([layer(ci, A, b, G, h) for ci in c])
    mapped = torch.func.vmap(lambda ci: layer(ci, A, b, G, h))(c)
    torch.testing.assert_close(batched, per_sample, atol=1e-9, rtol=0)
    torch.testing.assert_close(mapped, batched, atol=1e-9, rtol=0)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_smoothed_fenchel_young_loss_on_the_simplex(gamma):
    # L(c; w) = cᵀw + ½γ‖w‖² − min_x (cᵀx + ½γ‖x‖²) with the minimizer Π_simplex(−c/γ)
    gen = torch.Generator().manual_seed(9)
    c = torch.randn(4, 5, dtype=D, generator=gen, requires_grad=True)
    w = torch.rand(4, 5, dtype=D, generator=gen)
    w = w / w.sum(-1, keepdim=True)  # feasible targets
    layer = il.SmoothedLP(gamma)
    loss = layer.fenchel_young_loss(c, w, *simplex(5))
    x = project_simplex(-c.detach() / gamma)
    f = lambda v: (c.detach() * v).sum(-1) + gamma / 2 * v.square().sum(-1)  # noqa: E731
    torch.testing.assert_close(loss, f(w) - f(x), atol=1e-8, rtol=0)
    assert bool((loss > 0).all())
    (g,) = torch.autograd.grad(loss.sum(), c)
    torch.testing.assert_close(g, w - x, atol=1e-8, rtol=0)
    torch.testing.assert_close(layer.fenchel_young_loss(c.detach(), x, *simplex(5)), torch.zeros(4, dtype=D),
                               atol=1e-8, rtol=0)


# ---------------------------------------------------------------- PerturbedLP


def reference_estimator(c, sigma, Z, paths, y_bar, loo=False):
    """The defining formulas, from brute-force solutions Xₛ = x*(c + σZₛ): value (1/S) Σ Xₛ,
    Jacobian (1/(σS)) Σ Xₛ Zₛᵀ, or with the leave-one-out baseline (loo)
    (1/(σS)) Σ (Xₛ − mean of the other samples) Zₛᵀ, written literally."""
    X = brute_force_lp(c + sigma * Z, paths)
    S = len(X)
    if loo:
        J = sum(torch.einsum("...i,...j->...ij", X[s] - (X.sum(0) - X[s]) / (S - 1), Z[s])
                for s in range(S)) / (sigma * S)
    else:
        J = sum(torch.einsum("...i,...j->...ij", X[s], Z[s]) for s in range(S)) / (sigma * S)
    vjp = torch.einsum("...ij,...i->...j", J, y_bar)
    jvp = lambda dc: torch.einsum("...ij,...j->...i", J, dc)  # noqa: E731
    return X, X.mean(0), vjp, jvp


@pytest.mark.parametrize("loo", [False, True])
def test_perturbed_lp_value_and_gradient_are_the_monte_carlo_estimator(loo):
    A, b, G, h = shortest_path_lp(GRID)
    paths = grid_paths(GRID)
    gen = torch.Generator().manual_seed(4)
    c = (torch.rand(3, A.shape[1], dtype=D, generator=gen) + 0.2).requires_grad_()
    sigma, S, seed = 0.3, 16, 11
    y = il.PerturbedLP(sigma, S, seed=seed, variance_reduction=loo)(c, A, b, G, h)
    Z = torch.randn(S, *c.shape, dtype=D, generator=torch.Generator().manual_seed(seed))  # the seeded draw
    y_bar = torch.randn(c.shape, dtype=D, generator=gen)
    _, value, vjp, jvp = reference_estimator(c.detach(), sigma, Z, paths, y_bar, loo)
    torch.testing.assert_close(y, value, atol=1e-7, rtol=0)
    (g,) = torch.autograd.grad((y * y_bar).sum(), c)
    torch.testing.assert_close(g, vjp, atol=1e-6, rtol=0)
    # forward mode: the same estimator applied to a tangent
    dc = torch.randn(c.shape, dtype=D, generator=gen)
    layer = il.PerturbedLP(sigma, S, seed=seed, variance_reduction=loo)
    _, tangent = torch.func.jvp(lambda c: layer(c, A, b, G, h), (c.detach(),), (dc,))
    torch.testing.assert_close(tangent, jvp(dc), atol=1e-6, rtol=0)


@pytest.mark.parametrize("loo", [False, True])
def test_perturbed_lp_estimator_is_unbiased_on_a_two_vertex_lp(loo):
    # min c₁x₁ + c₂x₂ on the 2-simplex: x* = e₁ iff c₁ + σZ₁ < c₂ + σZ₂, so with Δ = c₂ − c₁,
    # s = σ√2: y₁ = Φ(Δ/s) and ∂y₁/∂c₁ = −φ(Δ/s)/s = −∂y₁/∂c₂.
    sigma, S = 0.5, 20000
    c = torch.tensor([1.0, 1.3], dtype=D, requires_grad=True)
    y = il.PerturbedLP(sigma, S, seed=0, variance_reduction=loo)(c, *simplex(2))
    (g,) = torch.autograd.grad(y[0], c)
    s, t = sigma * math.sqrt(2), 0.3 / (sigma * math.sqrt(2))
    y1 = 0.5 * (1 + math.erf(t / math.sqrt(2)))
    d1 = -math.exp(-t * t / 2) / math.sqrt(2 * math.pi) / s
    # 5 standard errors: std(x₁) ≤ 0.5, std(x₁Zⱼ/σ) ≤ 1/σ
    assert abs(float(y[0].detach()) - y1) < 5 * 0.5 / math.sqrt(S)
    assert abs(float(y.detach().sum()) - 1) < 1e-8
    torch.testing.assert_close(g, torch.tensor([d1, -d1], dtype=D), atol=5 / sigma / math.sqrt(S), rtol=0)


def test_perturbed_lp_is_reproducible_from_its_seed_and_draws_fresh_noise_per_call():
    A, b, G, h = shortest_path_lp(GRID)
    c = torch.rand(2, A.shape[1], dtype=D, generator=torch.Generator().manual_seed(5))
    first, second = il.PerturbedLP(0.5, 8, seed=3), il.PerturbedLP(0.5, 8, seed=3)
    y1, y2 = first(c, A, b, G, h), first(c, A, b, G, h)
    torch.testing.assert_close(second(c, A, b, G, h), y1, rtol=0, atol=0)
    torch.testing.assert_close(second(c, A, b, G, h), y2, rtol=0, atol=0)
    assert not torch.equal(y1, y2)
    from_generator = il.PerturbedLP(0.5, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(from_generator(c, A, b, G, h), y1, rtol=0, atol=0)


def test_perturbed_lp_batch_equals_per_sample_calls_with_the_same_noise():
    A, b, G, h = shortest_path_lp(GRID)
    gen = torch.Generator().manual_seed(6)
    c = torch.rand(4, A.shape[1], dtype=D, generator=gen).requires_grad_()
    Z = torch.randn(8, *c.shape, dtype=D, generator=gen)
    y_bar = torch.randn(c.shape, dtype=D, generator=gen)
    layer = il.PerturbedLP(0.4, 8)
    y = layer(c, A, b, G, h, noise=Z)
    (g,) = torch.autograd.grad((y * y_bar).sum(), c)
    for i in range(4):
        ci = c[i].detach().requires_grad_()
        yi = layer(ci, A, b, G, h, noise=Z[:, i])
        (gi,) = torch.autograd.grad((yi * y_bar[i]).sum(), ci)
        torch.testing.assert_close(yi, y[i], atol=1e-9, rtol=0)
        torch.testing.assert_close(gi, g[i], atol=1e-9, rtol=0)
    mapped = torch.func.vmap(lambda ci, zi: layer(ci, A, b, G, h, noise=zi), in_dims=(0, 1))(c.detach(), Z)
    torch.testing.assert_close(mapped, y.detach(), atol=1e-9, rtol=0)


def test_fenchel_young_loss_value_and_gradient():
    A, b, G, h = shortest_path_lp(GRID)
    paths = grid_paths(GRID)
    gen = torch.Generator().manual_seed(7)
    c = (torch.rand(3, A.shape[1], dtype=D, generator=gen) + 0.2).requires_grad_()
    w = paths[torch.randint(len(paths), (3,), generator=gen)]
    sigma, Z = 0.3, torch.randn(16, 3, A.shape[1], dtype=D, generator=gen)
    loss = il.PerturbedLP(sigma, 16).fenchel_young_loss(c, w, A, b, G, h, noise=Z)
    X, y, _, _ = reference_estimator(c.detach(), sigma, Z, paths, torch.zeros(c.shape, dtype=D))
    F_hat = ((c.detach() + sigma * Z) * X).sum(-1).mean(0)
    torch.testing.assert_close(loss, (c.detach() * w).sum(-1) - F_hat, atol=1e-7, rtol=0)
    (g,) = torch.autograd.grad(loss.sum(), c)
    torch.testing.assert_close(g, w - y, atol=1e-7, rtol=0)
    # at its own best path with no noise-driven switches, the loss vanishes for small σ
    best = brute_force_lp(c.detach(), paths)
    tiny = il.PerturbedLP(1e-6, 4).fenchel_young_loss(c.detach(), best, A, b, G, h)
    torch.testing.assert_close(tiny, torch.zeros(3, dtype=D), atol=1e-5, rtol=0)


def test_an_infeasible_lp_is_reported_not_averaged():
    A, b = torch.ones(1, 2, dtype=D), -torch.ones(1, dtype=D)  # 1ᵀx = −1 with x ≥ 0
    G, h = -torch.eye(2, dtype=D), torch.zeros(2, dtype=D)
    with pytest.raises(il.ConvergenceError, match="infeasible"):
        il.PerturbedLP(0.1, 4)(torch.ones(2, dtype=D), A, b, G, h)
    with pytest.raises(il.ConvergenceError, match="infeasible"):
        il.SmoothedLP(1.0)(torch.ones(2, dtype=D), A, b, G, h)


def test_bad_arguments_are_named():
    A, b, G, h = simplex(3)
    c = torch.ones(3, dtype=D)
    for bad in (0, -1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="gamma"):
            il.SmoothedLP(bad)
        with pytest.raises(ValueError, match="sigma"):
            il.PerturbedLP(bad)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="samples"):
            il.PerturbedLP(1.0, bad)
    with pytest.raises(ValueError, match="samples must be >= 2 with variance_reduction"):
        il.PerturbedLP(1.0, 1)
    il.PerturbedLP(1.0, 1, variance_reduction=False)  # one sample is a valid plain estimator
    with pytest.raises(ValueError, match="generator"):
        il.PerturbedLP(1.0, generator=0)
    with pytest.raises(ValueError, match="noise must have shape"):
        il.PerturbedLP(1.0, 4)(c, A, b, G, h, noise=torch.zeros(4, 2, dtype=D))
    with pytest.raises(ValueError, match="h requires grad"):
        il.PerturbedLP(1.0, 4)(c, A, b, G, h.clone().requires_grad_())
    with pytest.raises(ValueError, match="c must have a floating dtype"):
        il.SmoothedLP(1.0)(torch.ones(3, dtype=torch.int64), A, b, G, h)
    with pytest.raises(ValueError, match="target"):
        il.PerturbedLP(1.0, 4).fenchel_young_loss(c, torch.ones(3, dtype=torch.int64), A, b, G, h)


def test_functional_forms_equal_the_layers():
    from implicit_layers import functional as F

    A, b, G, h = shortest_path_lp(GRID)
    c = torch.rand(2, A.shape[1], dtype=D, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(F.smoothed_lp(c, A, b, G, h, gamma=0.5), il.SmoothedLP(0.5)(c, A, b, G, h),
                               rtol=0, atol=0)
    expected = il.PerturbedLP(0.3, 4, seed=2)(c, A, b, G, h)
    torch.testing.assert_close(F.perturbed_lp(c, A, b, G, h, sigma=0.3, samples=4, seed=2), expected,
                               rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    A, b, G, h = shortest_path_lp(GRID)
    gen = torch.Generator().manual_seed(10)
    c = torch.rand(3, A.shape[1], dtype=D, generator=gen)
    Z = torch.randn(8, *c.shape, dtype=D, generator=gen)
    cuda = [t.cuda() for t in (A, b, G, h)]
    layer = il.PerturbedLP(0.3, 8)
    torch.testing.assert_close(layer(c.cuda(), *cuda, noise=Z.cuda()).cpu(), layer(c, A, b, G, h, noise=Z),
                               atol=1e-8, rtol=0)
    assert layer(c.cuda(), *cuda).device.type == "cuda"  # the layer's own draw on the device
    torch.testing.assert_close(il.SmoothedLP(0.5)(c.cuda(), *cuda).cpu(), il.SmoothedLP(0.5)(c, A, b, G, h),
                               atol=1e-8, rtol=0)
