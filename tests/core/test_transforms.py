"""Composability: vmap, jacrev/jacfwd, forward_ad, module parameters, factorization reuse."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, jacfwd, jacrev, vmap

import implicit_layers as il
from implicit_layers import functional as F
from tests.core import problems


def _solve(residual, y0, **kw):
    return lambda *x: F.root_find(residual, x if len(x) > 1 else x[0], y0, **kw)


@pytest.mark.parametrize("adjoint", [il.DirectAdjoint(), il.KrylovAdjoint(il.GMRES(rtol=1e-13))])
def test_vmap_equals_batched_call(adjoint):
    residual, (W, u), y0, _ = problems.tanh_equilibrium(batch=(4,), n=5)
    batched = F.root_find(residual, (W, u), y0, adjoint=adjoint)
    mapped = vmap(lambda u, y0: F.root_find(residual, (W, u), y0, adjoint=adjoint))(u, y0)
    torch.testing.assert_close(mapped, batched, atol=1e-12, rtol=0)
    # gradients through vmap equal the batched gradients
    g_batched = grad(lambda u: F.root_find(residual, (W, u), y0, adjoint=adjoint).pow(2).sum())(u)
    g_mapped = vmap(grad(lambda u, y0: F.root_find(residual, (W, u), y0, adjoint=adjoint)
                         .pow(2).sum()))(u, y0)
    torch.testing.assert_close(g_mapped, g_batched, atol=1e-10, rtol=0)


def test_jacrev_jacfwd_agree_with_reference():
    residual, (W, u), y0, ref = problems.tanh_equilibrium(batch=(), n=4)
    J_ref = jacrev(lambda u: ref(W, u))(u)
    J_rev = jacrev(lambda u: F.root_find(residual, (W, u), y0))(u)
    J_fwd = jacfwd(lambda u: F.root_find(residual, (W, u), y0))(u)
    torch.testing.assert_close(J_rev, J_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(J_fwd, J_ref, atol=1e-10, rtol=0)


def test_forward_ad_matches_finite_differences():
    residual, (W, u), y0, _ = problems.tanh_equilibrium(batch=(3,), n=4)
    du, dW = torch.randn_like(u), torch.randn_like(W)
    with fwAD.dual_level():
        y = F.root_find(residual, (fwAD.make_dual(W, dW), fwAD.make_dual(u, du)), y0)
        tangent = fwAD.unpack_dual(y).tangent
    eps = 1e-6
    plus = F.root_find(residual, (W + eps * dW, u + eps * du), y0)
    minus = F.root_find(residual, (W - eps * dW, u - eps * du), y0)
    torch.testing.assert_close(tangent, (plus - minus) / (2 * eps), atol=1e-8, rtol=0)


class TanhCell(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.W = torch.nn.Parameter(0.3 * torch.randn(n, n, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, x, y):
        return torch.tanh(y @ self.W.T + x + self.bias) - y


def test_module_parameters_receive_exact_gradients():
    cell = TanhCell(4)
    layer = il.ImplicitLayer(cell, il.Newton())
    x = torch.randn(6, 4, dtype=torch.float64)
    layer(x, torch.zeros_like(x)).pow(2).sum().backward()
    W, bias = (p.detach().clone().requires_grad_() for p in (cell.W, cell.bias))
    y = torch.zeros_like(x)
    for _ in range(300):  # unrolled reference
        y = torch.tanh(y @ W.T + x + bias)
    y.pow(2).sum().backward()
    torch.testing.assert_close(cell.W.grad, W.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(cell.bias.grad, bias.grad, atol=1e-10, rtol=0)
    assert layer.stats.forward.all_converged and layer.stats.backward is not None


def test_module_parameters_under_vmap_and_forward_mode():
    cell = TanhCell(3)
    layer = il.ImplicitLayer(cell, il.Newton())
    x = torch.randn(5, 3, dtype=torch.float64)
    y0 = torch.zeros_like(x)
    torch.testing.assert_close(vmap(layer)(x, y0), layer(x, y0), atol=1e-12, rtol=0)
    dx = torch.randn_like(x)
    _, y_dot = torch.func.jvp(lambda x: layer(x, y0), (x,), (dx,))
    J = jacrev(lambda x: layer(x, y0))(x).reshape(15, 15)
    torch.testing.assert_close(y_dot.reshape(-1), J @ dx.reshape(-1), atol=1e-10, rtol=0)


class CountingLU(il.LU):
    calls = 0

    def factor(self, op, what="the linear system"):
        CountingLU.calls += 1
        return super().factor(op, what)


def test_direct_adjoint_factors_once_for_backward_and_double_backward():
    residual, (A, b), y0, _ = problems.linear_system(batch=(2,), n=3)
    b.requires_grad_()
    CountingLU.calls = 0
    y = F.root_find(residual, (A, b), y0, adjoint=il.DirectAdjoint(CountingLU()))
    (g,) = torch.autograd.grad(y.pow(3).sum(), b, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), b)
    assert CountingLU.calls == 1  # the transposed and plain solves share one factorization
    H = [torch.func.hessian(lambda b, Ai=Ai: torch.linalg.solve(Ai, b).pow(3).sum())(bi)
         for Ai, bi in zip(A, b.detach())]
    torch.testing.assert_close(gg, torch.stack([Hi.sum(0) for Hi in H]), atol=1e-10, rtol=0)


class FactoringSolver(il.RootSolver):
    """Solves a linear residual A y = b with one LU and hands the factorization on."""

    name = "factoring"

    def __init__(self, A):
        super().__init__()
        self.A = A

    def solve(self, problem, y0):
        fac = il.LU().factor(self.A.detach())
        y = fac.solve(-problem.residual(torch.zeros_like(y0)))
        return il.SolveResult(y, il.SolverStats.exact(self.name, y.shape[:-1]), aux=fac)


class ReuseForwardFactorization(il.Adjoint):
    def solve(self, lin, rhs, transpose):
        assert lin.aux is not None, "the forward factorization should be handed over"
        return lin.aux.solve(rhs, transpose=transpose), il.SolverStats.exact("reuse", rhs.shape[:-1])


def test_custom_adjoint_reuses_forward_factorization():
    residual, (A, b), y0, ref = problems.linear_system()
    b.requires_grad_()
    y = F.root_find(residual, (A, b), y0, solver=FactoringSolver(A), adjoint=ReuseForwardFactorization())
    (g,) = torch.autograd.grad(y.sum(), b)
    (g_ref,) = torch.autograd.grad(ref(A, b).sum(), b)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)


def test_module_registered_twice_keeps_its_parameters_and_gets_summed_gradients():
    """A cell used by both the residual and the fixed-point map: backward must leave real
    Parameters behind (torch's functional_call restores tied names in the wrong order)."""

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Parameter(0.3 * torch.randn(3, 3, dtype=torch.float64))

        def forward(self, x, z):
            return torch.tanh(z @ self.W.T + x)

    class Residual(torch.nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.cell = cell

        def forward(self, x, z):
            return self.cell(x, z) - z

    cell = Cell()
    layer = il.ImplicitLayer(Residual(cell), il.Picard(), fixed_point_map=cell)
    x = torch.randn(4, 3, dtype=torch.float64)
    for _ in range(2):
        layer(x, torch.zeros_like(x)).sum().backward()
    assert isinstance(cell.W, torch.nn.Parameter)
    W = cell.W.detach().clone().requires_grad_()
    z = torch.zeros_like(x)
    for _ in range(300):
        z = torch.tanh(z @ W.T + x)
    (g,) = torch.autograd.grad(z.sum(), W)
    torch.testing.assert_close(cell.W.grad, 2 * g, atol=1e-9, rtol=0)
