"""Cells kept contractive by torch's parametrizations (``torch.nn.utils.parametrizations``):
the spectral norm bounds ‖W‖₂ by 1, so ``z ↦ tanh(c W z + U x)`` is a c-contraction whatever
the optimizer does to the raw weight."""

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import implicit_layers as il

D64 = torch.float64


class SpectralCell(nn.Module):
    """``tanh(c · W z / σ(W) + U x)``: Lipschitz in z with constant at most c."""

    def __init__(self, n=6, c=0.9, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.W = spectral_norm(nn.Linear(n, n, bias=False, dtype=D64))
        self.U = nn.Linear(n, n, dtype=D64)
        self.c = c

    def forward(self, x, z):
        return torch.tanh(self.c * self.W(z) + self.U(x))


def test_spectral_norm_keeps_the_cell_contractive_under_training():
    cell = SpectralCell()
    with torch.no_grad():
        cell.W.parametrizations.weight.original.mul_(10.0)  # ‖W_raw‖₂ ≫ 1
    deq = il.DEQLayer(cell)
    opt = torch.optim.SGD(cell.parameters(), lr=1.0)
    x = torch.randn(8, 6, dtype=D64)
    for _ in range(10):  # a loss that rewards large states pushes the weights up
        z = deq(x)
        opt.zero_grad()
        (-z.square().sum()).backward()
        opt.step()
        assert deq.stats.forward.all_converged and deq.stats.backward.all_converged
    cell.eval()  # σ(W) fixed (no power iteration per call): a fixed map
    z = deq(x)
    assert float(deq.spectral_radius(x, z, iters=60).max()) <= 0.9 + 1e-6
    assert float(torch.linalg.matrix_norm(cell.W.weight.detach(), 2)) <= 1 + 1e-6


def test_gradient_through_the_parametrization_is_the_implicit_gradient():
    """In eval mode the map is fixed; the gradient with respect to the raw weight equals
    (∂cell/∂θ)ᵀ (I − Jᵀ)⁻¹ z̄ from dense Jacobians."""
    cell = SpectralCell(n=4, seed=1).eval()
    deq = il.DEQLayer(cell, solver=il.Anderson(tol=1e-13, rtol=1e-13),
                      adjoint=il.DirectAdjoint())
    x = torch.randn(1, 4, dtype=D64)
    v = torch.randn(1, 4, dtype=D64)
    raw = cell.W.parametrizations.weight.original
    (got,) = torch.autograd.grad((deq(x) * v).sum(), raw)
    z = deq(x).detach()
    J = torch.func.jacrev(lambda zz: cell(x, zz))(z).reshape(4, 4).detach()
    u = torch.linalg.solve(torch.eye(4, dtype=D64) - J.T, v[0])
    (ref,) = torch.autograd.grad((cell(x, z) * u).sum(), raw)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


class WeightNormCell(nn.Module):
    def __init__(self, n=5):
        super().__init__()
        self.lin = weight_norm(nn.Linear(n, n, dtype=D64))

    def forward(self, x, z):
        return torch.tanh(0.3 * self.lin(z) + x)


def test_weight_norm_parameters_receive_gradients():
    cell = WeightNormCell()
    deq = il.DEQLayer(cell)
    deq(torch.randn(3, 5, dtype=D64)).sum().backward()
    g, v = cell.lin.parametrizations.weight.original0, cell.lin.parametrizations.weight.original1
    assert g.grad is not None and v.grad is not None and bool(v.grad.abs().sum() > 0)
