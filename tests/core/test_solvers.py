"""Forward solvers: per-sample convergence, stats, and agreement across solvers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit_layers as il
from implicit_layers import functional as F
from implicit_layers.solvers.base import RootProblem
from tests.core import problems

DT = torch.float64
SOLVERS = [il.Newton(), il.Broyden(), il.Broyden(init="identity"), il.ScipyRoot(), il.Picard()]


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_solvers_agree_on_contractive_equilibrium(solver):
    residual, (W, u), y0, ref = problems.tanh_equilibrium(batch=(3,), n=4)
    result = solver.solve(RootProblem(lambda y: residual((W, u), y)), y0)
    torch.testing.assert_close(result.y, ref(W, u), atol=1e-10, rtol=0)
    assert result.stats.all_converged
    assert result.stats.residual.shape == (3,)
    assert result.stats.trace is not None


def test_per_sample_iteration_counts():
    # sample 0 starts at its solution; sample 1 needs Newton steps
    x = torch.tensor([1.0, 8.0], dtype=DT)
    result = il.Newton().solve(RootProblem(lambda y: y**3 - x, event_ndim=0),
                               torch.tensor([1.0, 1.0], dtype=DT))
    assert result.stats.iterations[0] == 0 and result.stats.iterations[1] > 2
    torch.testing.assert_close(result.y, torch.tensor([1.0, 2.0], dtype=DT))


def test_newton_line_search_rescues_a_bad_start():
    # arctan: undamped Newton diverges from |y0| > 1.39
    y = F.root_find(lambda x, y: torch.atan(y) - x, torch.zeros(1, dtype=DT), torch.full((1,), 3.0, dtype=DT))
    assert abs(float(y)) < 1e-10


def test_layer_stats_are_recorded():
    layer = il.RootFindLayer(lambda x, y: y**3 - x, event_ndim=0)
    x = torch.tensor([8.0, 27.0], dtype=DT, requires_grad=True)
    layer(x, torch.ones(2, dtype=DT)).sum().backward()
    summary = layer.stats.summary()
    assert summary["forward/frac_converged"] == 1.0 and summary["forward/iterations_max"] >= 3
    assert summary["backward/frac_converged"] == 1.0


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 6), batch=st.integers(1, 4), scale=st.floats(0.05, 0.9), seed=st.integers(0, 10**6))
def test_property_random_contractive_problems(n, batch, scale, seed):
    """On random contractive tanh equilibria the implicit gradient equals unrolled autograd."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, dtype=DT, generator=g)
    W = scale * W / torch.linalg.matrix_norm(W, ord=2).clamp_min(1e-12)
    u = torch.randn(batch, n, dtype=DT, generator=g, requires_grad=True)
    y = F.root_find(lambda u, y: torch.tanh(y @ W.T + u) - y, u, torch.zeros(batch, n, dtype=DT))
    z = torch.zeros(batch, n, dtype=DT)
    for _ in range(400):
        z = torch.tanh(z @ W.T + u)
    torch.testing.assert_close(y, z, atol=1e-10, rtol=0)
    w = torch.randn(batch, n, dtype=DT, generator=g)
    (g1,) = torch.autograd.grad((y * w).sum(), u)
    (g2,) = torch.autograd.grad((z * w).sum(), u)
    torch.testing.assert_close(g1, g2, atol=1e-9, rtol=0)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_property_random_linear_systems_all_adjoints(n, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(2, n, n, dtype=DT, generator=g) + 3 * n**0.5 * torch.eye(n, dtype=DT)
    b = torch.randn(2, n, dtype=DT, generator=g, requires_grad=True)
    (g_ref,) = torch.autograd.grad(torch.linalg.solve(A, b).sum(), b)
    for adjoint in (il.DirectAdjoint(), il.KrylovAdjoint(il.GMRES(rtol=1e-13)),
                    il.KrylovAdjoint(il.BiCGStab(rtol=1e-13))):
        y = F.root_find(lambda x, y: (A @ y[..., None]).squeeze(-1) - x, b, torch.zeros(2, n, dtype=DT),
                        adjoint=adjoint)
        (grad,) = torch.autograd.grad(y.sum(), b)
        torch.testing.assert_close(grad, g_ref, atol=1e-9, rtol=0)


@pytest.mark.parametrize("solver", [il.Newton(), il.Broyden(), il.Picard()], ids=repr)
def test_float32_solves_and_gradients(solver):
    residual, (W, u), y0, ref = problems.tanh_equilibrium(batch=(3,), n=4)
    W, u, y0 = W.float(), u.float().requires_grad_(), y0.float()
    y = F.root_find(residual, (W, u), y0, solver=solver)
    assert y.dtype == torch.float32
    (g,) = torch.autograd.grad(y.sum(), u)
    u64 = u.detach().double().requires_grad_()
    (g_ref,) = torch.autograd.grad(ref(W.double(), u64).sum(), u64)
    torch.testing.assert_close(g, g_ref.float(), atol=1e-4, rtol=1e-4)


def test_broyden_memory_budget_is_fixed():
    residual, (W, u), y0, ref = problems.tanh_equilibrium(batch=(2,), n=30, rho=0.9)
    result = il.Broyden(memory=3, init="identity").solve(RootProblem(lambda y: residual((W, u), y)), y0)
    assert result.stats.all_converged and int(result.stats.iterations.max()) > 3
    torch.testing.assert_close(result.y, ref(W, u), atol=1e-10, rtol=0)
