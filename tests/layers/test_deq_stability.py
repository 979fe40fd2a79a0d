"""Stability tools: Hutchinson estimate of ‖J‖²_F, spectral radius by power iteration, and
the off-equilibrium warning."""

import warnings

import pytest
import torch

import implicit_layers as il
from implicit_layers.layers.deq.stability import (
    jacobian_frobenius_estimate,
    spectral_radius,
    warn_off_equilibrium,
)
from tests.layers.test_deq import TanhCell

D64 = torch.float64


def test_hutchinson_is_unbiased_for_a_known_jacobian():
    A = torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.4, 0.0], [0.0, 0.2, -0.6]], dtype=D64)
    gen = torch.Generator().manual_seed(0)
    est = jacobian_frobenius_estimate(lambda z: z @ A.T, torch.zeros(50, 3, dtype=D64),
                                      samples=200, generator=gen)
    exact = float((A**2).sum())
    assert est.shape == (50,)
    assert abs(float(est.mean()) - exact) < 0.02 * exact  # 10⁴ probes: ~1% standard error
    assert float(est.std()) > 0  # a genuine random estimate, not the exact value


def test_hutchinson_is_differentiable_in_parameters_not_in_z():
    cell = TanhCell(n=4)
    x = torch.randn(2, 4, dtype=D64)
    z = torch.randn(2, 4, dtype=D64, requires_grad=True)
    est = jacobian_frobenius_estimate(lambda zz: cell(x, zz), z, samples=2)
    gW, gz = torch.autograd.grad(est.sum(), (cell.W, z), allow_unused=True)
    assert gz is None and float(gW.abs().sum()) > 0
    # single-probe estimate, computed by hand: ‖εᵀ J‖² with J from jacrev
    gen = torch.Generator().manual_seed(4)
    est1 = jacobian_frobenius_estimate(lambda zz: cell(x, zz), z, generator=gen)
    eps = torch.randn(2, 4, generator=torch.Generator().manual_seed(4), dtype=D64)
    J = torch.func.vmap(torch.func.jacrev(lambda zi, xi: cell(xi, zi)))(z.detach(), x)
    torch.testing.assert_close(est1, (eps.unsqueeze(-2) @ J).squeeze(-2).square().sum(-1))


def test_spectral_radius_symmetric_and_complex_pair():
    sym = torch.diag(torch.tensor([0.95, -0.5, 0.3], dtype=D64))
    Q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=D64, generator=torch.Generator().manual_seed(1)))
    S = Q @ sym @ Q.T
    rho = spectral_radius(lambda z: z @ S.T, torch.zeros(2, 3, dtype=D64), iters=200)
    torch.testing.assert_close(rho, torch.full((2,), 0.95, dtype=D64), atol=1e-6, rtol=0)
    c, s = 0.9 * torch.cos(torch.tensor(1.0)), 0.9 * torch.sin(torch.tensor(1.0))
    R = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 0.4]], dtype=D64)  # |λ| = 0.9 pair
    rho = spectral_radius(lambda z: z @ R.T, torch.zeros(1, 3, dtype=D64), iters=100)
    assert abs(float(rho) - 0.9) < 1e-6


def test_layer_helpers_at_the_equilibrium():
    cell = TanhCell(n=6, rho=0.9)
    layer = il.DEQLayer(cell)
    x = torch.randn(3, 6, dtype=D64)
    z = layer(x)
    rho = layer.spectral_radius(x, z, iters=300)
    J = torch.func.vmap(torch.func.jacrev(lambda zi, xi: cell(xi, zi)))(z.detach(), x)
    exact = torch.linalg.eigvals(J).abs().amax(-1)
    torch.testing.assert_close(rho, exact, atol=2e-2, rtol=0)  # power iteration, non-normal J
    assert bool((rho < 1).all())
    reg = layer.jacobian_regularization(x, z, samples=3)
    assert reg.shape == (3,)
    reg.mean().backward()
    assert cell.W.grad is not None and float(cell.W.grad.abs().sum()) > 0


def test_off_equilibrium_warning():
    z = torch.ones(2, 4, dtype=D64)
    with pytest.warns(il.ConvergenceWarning, match="1 of 2 samples"):
        assert warn_off_equilibrium(torch.tensor([1e-2, 1e-9], dtype=D64), z, threshold=1e-3)
    with pytest.warns(il.ConvergenceWarning):
        assert warn_off_equilibrium(torch.tensor([float("nan"), 0.0]), z, threshold=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_off_equilibrium(torch.tensor([1e-5, 0.0], dtype=D64), z, threshold=1e-3)


def test_no_warning_at_a_converged_equilibrium_at_zero():
    """z = θ ⊙ z has the fixed point 0; the solve stops at a tiny z whose relative residual is
    large (0.8) but whose residual meets the absolute tolerance: no warning (issue 13)."""
    theta = torch.tensor([0.05, 0.2], dtype=D64)
    x = torch.ones(3, 2, dtype=D64, requires_grad=True)
    deq = il.DEQLayer(lambda x, z: theta * z + 0 * x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = deq(x, torch.ones(3, 2, dtype=D64))
    assert float(z.detach().abs().max()) < 1e-10
    with pytest.warns(il.ConvergenceWarning, match="1 of 2"):
        warn_off_equilibrium(torch.tensor([1e-3, 1e-13], dtype=D64), torch.zeros(2, 2),
                             threshold=1e-3, atol=1e-12)


def test_bad_arguments():
    f = lambda z: 0.5 * z  # noqa: E731
    with pytest.raises(ValueError, match="samples"):
        jacobian_frobenius_estimate(f, torch.zeros(1, 2), samples=0)
    with pytest.raises(ValueError, match="iters"):
        spectral_radius(f, torch.zeros(1, 2), iters=1)
