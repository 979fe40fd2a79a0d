"""DEQLayer(x, trajectory=k) for fixed-point correction, and warm starts from a previous
equilibrium: the states are the solver's iterates, each differentiated at its own point."""

import pytest
import torch

import implicit_layers as il
from implicit_layers.layers.deq.trajectory import TrajectoryRecorder
from tests.layers.test_deq import TanhCell, linear_pieces

D64 = torch.float64
TIGHT = dict(tol=1e-13, rtol=1e-13)


def test_states_are_the_picard_iterates():
    """cell(x, z) = A z + x from z0 = 0: Picard's iterate t is Σ_{j<t} A^j x."""
    A, x = linear_pieces(rho=0.7)
    deq = il.DEQLayer(lambda x, z: z @ A.T + x, solver=il.Picard(**TIGHT))
    states = deq(x, trajectory=4)
    iterations = deq.stats.forward.extra["trajectory"]
    assert len(states) == 4 and iterations[-1] == int(deq.stats.forward.iterations.max())
    for t, z in zip(iterations[:-1], states[:-1]):
        partial = sum(x @ torch.linalg.matrix_power(A, j).T for j in range(t))
        torch.testing.assert_close(z, partial, rtol=1e-12, atol=1e-12)
    z_star = torch.linalg.solve(torch.eye(5, dtype=D64) - A, x.T).T
    torch.testing.assert_close(states[-1], z_star, rtol=1e-10, atol=1e-10)


def _sample_jacobians(cell, xb, zb):
    """Dense ∂cell/∂z and ∂cell/∂x of one sample (shapes (1, n)) at (xb, zb)."""
    n = zb.shape[-1]
    Jz = torch.func.jacrev(lambda zz: cell(xb, zz))(zb).reshape(n, n).detach()
    Jx = torch.func.jacrev(lambda xx: cell(xx, zb))(xb).reshape(n, n).detach()
    return Jz, Jx


def test_correction_loss_gradient_is_the_implicit_gradient_at_each_state():
    """∇ Σ γ^(k−i) ℓ(z_i) = Σ γ^(k−i) (∂cell/∂(x, θ))ᵀ u_i with u_i = (I − J_iᵀ)⁻¹ ∇ℓ(z_i),
    J_i = ∂cell/∂z at z_i (dense Jacobians as the reference)."""
    cell = TanhCell(n=5, rho=0.9, seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, generator=gen, dtype=D64, requires_grad=True)
    target = torch.randn(3, 5, generator=gen, dtype=D64)
    gamma, k = 0.8, 3
    deq = il.DEQLayer(cell, solver=il.Anderson(m=2, **TIGHT),
                      adjoint=il.FixedPointAdjoint(il.Anderson(**TIGHT)))
    states = deq(x, trajectory=k)
    loss = sum(gamma ** (k - i) * 0.5 * (z - target).square().sum()
               for i, z in enumerate(states, 1))
    wrt = (x, *cell.parameters())
    got = torch.autograd.grad(loss, wrt)

    u = torch.zeros(k, 3, 5, dtype=D64)  # u_i per state and sample
    for i, z in enumerate(states):
        for b in range(3):
            Jz, _ = _sample_jacobians(cell, x[b:b + 1].detach(), z[b:b + 1].detach())
            u[i, b] = torch.linalg.solve(torch.eye(5, dtype=D64) - Jz.T,
                                         gamma ** (k - 1 - i) * (z[b].detach() - target[b]))
    # (∂cell/∂(x, θ))ᵀ u_i at each state, by autograd through one cell evaluation
    cells = sum((cell(x, z.detach()) * u[i]).sum() for i, z in enumerate(states))
    expected = torch.autograd.grad(cells, wrt)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_phantom_trajectory_adjoint_truncates_the_series_at_each_state():
    """With the phantom adjoint, each state z_i gets x̄ = (∂cell/∂x)ᵀ τ Σ_{j<k} Aʲ v,
    A = (1 − τ) I + τ J_iᵀ, all Jacobians at (x, z_i) (see PhantomAdjoint)."""
    cell = TanhCell(n=5, rho=0.8, seed=3)
    x = torch.randn(2, 5, dtype=D64, requires_grad=True)
    k, tau = 3, 0.5
    deq = il.DEQLayer(cell, solver=il.Picard(**TIGHT),
                      trajectory_adjoint=il.PhantomAdjoint(k=k, damping=tau))
    states = deq(x, trajectory=3)
    v = torch.randn(2, 5, dtype=D64)
    got = torch.autograd.grad(sum((z * v).sum() for z in states[:-1]), x)[0]
    ref = torch.zeros_like(x)
    for z in states[:-1]:
        for b in range(2):
            Jz, Jx = _sample_jacobians(cell, x[b:b + 1].detach(), z[b:b + 1].detach())
            A = (1 - tau) * torch.eye(5, dtype=D64) + tau * Jz.T
            u = tau * sum(torch.linalg.matrix_power(A, j) @ v[b] for j in range(k))
            ref[b] += Jx.T @ u
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_trajectory_of_a_long_solve_keeps_few_states_spread_over_it():
    rec = TrajectoryRecorder(k=4)
    for it in range(1000):
        rec(it, torch.tensor(float(it)))
        assert len(rec.kept) <= 8
    iterations, states = rec.pick(999)
    assert iterations == sorted(iterations) and len(states) == 3
    for i, it in enumerate(iterations, 1):
        assert abs(it - i * 999 / 4) <= rec.stride


def test_trajectory_shorter_than_k_repeats_states():
    A, x = linear_pieces(rho=0.1)
    deq = il.DEQLayer(lambda x, z: z @ A.T + x, solver=il.Newton())
    states = deq(x, trajectory=5)  # Newton: one step on a linear cell
    assert len(states) == 5 and deq.stats.forward.extra["trajectory"][-1] == 1
    assert all(z.shape == x.shape for z in states)


def test_trajectory_stats_and_bad_argument():
    deq = il.DEQLayer(TanhCell(n=5), solver=il.Anderson(**TIGHT))
    x = torch.randn(2, 5, dtype=D64)
    z = deq(x)
    states = deq(x, trajectory=2)
    torch.testing.assert_close(states[-1], z)
    assert deq.stats.forward.all_converged and deq.stats.forward.solver == "Anderson"
    with pytest.raises(ValueError, match="trajectory"):
        deq(x, trajectory=0)
    with pytest.raises(ValueError, match="torch.func"):
        torch.func.vmap(lambda xx: deq(xx, trajectory=2)[0])(x.unsqueeze(0))


def test_warm_start_from_the_previous_equilibrium():
    """Starting at the equilibrium of the same input takes no iteration; after a small change
    of the cell, starting there takes fewer iterations than from zeros (contraction: the
    error shrinks by ρ per step from a smaller start)."""
    cell = TanhCell(n=5, rho=0.9, seed=4)
    deq = il.DEQLayer(cell, solver=il.Picard(**TIGHT))
    x = torch.randn(4, 5, dtype=D64)
    z = deq(x).detach()
    again = deq(x, z)
    assert int(deq.stats.forward.iterations.max()) == 0 and torch.equal(again, z)
    with torch.no_grad():
        cell.b.add_(1e-3)
    deq(x)
    cold = deq.stats.forward.iterations
    deq(x, z)
    warm = deq.stats.forward.iterations
    assert bool((warm < cold).all())
