"""DEQLayer / F.fixed_point: solver × problem grid against closed forms, implicit gradients
against unrolled backprop, gradcheck/gradgradcheck, forward mode, vmap, failure policy."""

import copy
import warnings

import pytest
import torch
from torch import nn

import implicit_layers as il
from implicit_layers import functional as F
from implicit_layers.testing.memory import saved_tensor_bytes

D64 = torch.float64


def linear_pieces(B=3, n=5, rho=0.8, seed=0):
    """cell(x, z) = A z + x with symmetric A of spectral radius rho: z* = (I − A)⁻¹ x."""
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=gen, dtype=D64)
    S = M + M.T
    A = rho * S / torch.linalg.eigvalsh(S).abs().max()
    x = torch.randn(B, n, generator=gen, dtype=D64)
    return A, x


class TanhCell(nn.Module):
    """z ↦ tanh(W z + U x + b): a contraction for ‖W‖ < 1."""

    def __init__(self, n=5, rho=0.7, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=gen, dtype=D64)
        self.W = nn.Parameter(rho * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(n, n, generator=gen, dtype=D64) / n**0.5)
        self.b = nn.Parameter(0.1 * torch.randn(n, generator=gen, dtype=D64))

    def forward(self, x, z):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def unrolled(cell, x, z0, steps=300):
    z = z0
    for _ in range(steps):
        z = cell(x, z)
    return z


SOLVERS = {
    "anderson": lambda: il.Anderson(),
    "anderson_damped": lambda: il.Anderson(m=3, damping=0.7),
    "picard": lambda: il.Picard(max_iter=1000),
    "broyden": lambda: il.Broyden(init="identity"),
    "broyden_jac": lambda: il.Broyden(init="jacobian"),
}


@pytest.mark.parametrize("solver", SOLVERS)
def test_linear_cell_forward_and_gradient_match_closed_form(solver):
    A, x = linear_pieces()
    x = x.requires_grad_()
    layer = il.DEQLayer(lambda x, z: z @ A.T + x, solver=SOLVERS[solver]())
    z = layer(x)
    I = torch.eye(5, dtype=D64)
    torch.testing.assert_close(z, torch.linalg.solve(I - A, x.mT).mT, atol=1e-9, rtol=1e-9)
    v = torch.randn_like(z)
    (g,) = torch.autograd.grad((z * v).sum(), x)
    torch.testing.assert_close(g, torch.linalg.solve((I - A).T, v.mT).mT, atol=1e-9, rtol=1e-9)
    assert layer.stats.forward.all_converged and layer.stats.backward.all_converged


@pytest.mark.parametrize("solver", SOLVERS)
def test_tanh_cell_parameter_gradients_match_unrolled_backprop(solver):
    cell = TanhCell()
    x = torch.randn(4, 5, dtype=D64, requires_grad=True)
    layer = il.DEQLayer(cell, solver=SOLVERS[solver]())
    z = layer(x)
    z_ref = unrolled(cell, x, torch.zeros(4, 5, dtype=D64))
    torch.testing.assert_close(z, z_ref, atol=1e-9, rtol=1e-9)
    v = torch.randn_like(z)
    wrt = (x, *cell.parameters())
    got = torch.autograd.grad((z * v).sum(), wrt)
    ref = torch.autograd.grad((z_ref * v).sum(), wrt)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)


def test_event_ndim_two():
    """Matrix-valued states: z = 0.5 tanh(z) @ M + x, samples of shape (3, 4)."""
    M = torch.tensor([[0.5, 0.2, 0.0, 0.1], [0.0, 0.3, 0.1, 0.0],
                      [0.2, 0.0, 0.4, 0.0], [0.1, 0.1, 0.0, 0.3]], dtype=D64)
    cell = lambda x, z: 0.5 * torch.tanh(z) @ M + x  # noqa: E731
    x = torch.randn(2, 3, 4, dtype=D64, requires_grad=True)
    z = il.DEQLayer(cell, event_ndim=2)(x)
    z_ref = unrolled(cell, x, torch.zeros_like(x), steps=200)
    torch.testing.assert_close(z, z_ref, atol=1e-10, rtol=1e-10)
    v = torch.randn_like(z)
    torch.testing.assert_close(torch.autograd.grad((z * v).sum(), x)[0],
                               torch.autograd.grad((z_ref * v).sum(), x)[0], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("adjoint", [
    il.FixedPointAdjoint(il.Picard(max_iter=500)),
    il.FixedPointAdjoint(il.Anderson()),
    il.KrylovAdjoint(il.GMRES(rtol=1e-12)),
    il.DirectAdjoint(),
], ids=["picard", "anderson", "gmres", "direct"])
def test_backward_modes_agree(adjoint):
    cell = TanhCell()
    x = torch.randn(3, 5, dtype=D64, requires_grad=True)
    z = il.DEQLayer(cell, adjoint=adjoint)(x)
    v = torch.randn_like(z)
    got = torch.autograd.grad((z * v).sum(), (x, cell.W))
    z_ref = unrolled(cell, x, torch.zeros_like(x))
    ref = torch.autograd.grad((z_ref * v).sum(), (x, cell.W))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)


def _functional_cell(x, z):
    """cell with its parameters passed through x = (x, W, U): gradcheck sees all of them."""
    x_, W, U = x
    return torch.tanh(z @ W.T + x_ @ U.T)


def test_gradcheck_and_gradgradcheck():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, generator=gen, dtype=D64, requires_grad=True)
    W = (0.4 * torch.randn(3, 3, generator=gen, dtype=D64)).requires_grad_()
    U = torch.randn(3, 3, generator=gen, dtype=D64, requires_grad=True)
    solver = il.Anderson(tol=1e-13, rtol=1e-13)
    adjoint = il.FixedPointAdjoint(il.Anderson(tol=1e-13, rtol=1e-13))
    layer = il.DEQLayer(_functional_cell, solver=solver, adjoint=adjoint)
    fn = lambda x, W, U: layer((x, W, U), torch.zeros(2, 3, dtype=D64))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, W, U))
    assert torch.autograd.gradgradcheck(fn, (x, W, U))


def test_forward_mode_against_finite_differences_and_reverse():
    cell = TanhCell(n=4)
    layer = il.DEQLayer(cell, solver=il.Anderson(tol=1e-13, rtol=1e-13),
                        adjoint=il.FixedPointAdjoint(il.Anderson(tol=1e-13, rtol=1e-13)))
    x = torch.randn(2, 4, dtype=D64)
    dx = torch.randn_like(x)
    z, dz = torch.func.jvp(lambda x: layer(x), (x,), (dx,))
    assert layer.stats.tangent.all_converged
    eps = 1e-6
    with torch.no_grad():
        fd = (layer(x + eps * dx) - layer(x - eps * dx)) / (2 * eps)
    torch.testing.assert_close(dz, fd, atol=1e-8, rtol=1e-6)
    with torch.autograd.forward_ad.dual_level():
        out = layer(torch.autograd.forward_ad.make_dual(x, dx))
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(out).tangent, dz)
    jf = torch.func.jacfwd(lambda x: layer(x))(x[:1])
    jr = torch.func.jacrev(lambda x: layer(x))(x[:1])
    torch.testing.assert_close(jf, jr, atol=1e-10, rtol=1e-9)


def test_vmap_equals_batched_call():
    cell = TanhCell(n=4)
    layer = il.DEQLayer(cell)
    x = torch.randn(3, 2, 4, dtype=D64)
    z0 = torch.zeros(2, 4, dtype=D64)
    batched = layer(x.reshape(6, 4), z0.repeat(3, 1)).reshape(3, 2, 4)
    mapped = torch.func.vmap(lambda xi: layer(xi, z0))(x)
    torch.testing.assert_close(mapped, batched, atol=1e-10, rtol=1e-10)
    g_map = torch.func.vmap(torch.func.grad(lambda xi: layer(xi, z0).square().sum()))(x)
    xb = x.clone().requires_grad_()
    g_batch = torch.autograd.grad(layer(xb.reshape(6, 4), z0.repeat(3, 1)).square().sum(), xb)[0]
    torch.testing.assert_close(g_map, g_batch, atol=1e-9, rtol=1e-9)


def test_memory_independent_of_forward_iterations():
    cell = TanhCell(n=16, rho=0.95)
    gen = torch.Generator().manual_seed(5)
    x = (0.1 * torch.randn(8, 16, generator=gen, dtype=D64)).requires_grad_()
    loose = il.DEQLayer(cell, solver=il.Picard(tol=1e-3, rtol=1e-3), warn_residual=None)
    tight = il.DEQLayer(cell, solver=il.Picard(tol=1e-12, rtol=1e-12, max_iter=2000))
    b_loose = saved_tensor_bytes(lambda: loose(x))
    b_tight = saved_tensor_bytes(lambda: tight(x))
    it_loose = int(loose.stats.forward.iterations.max())
    it_tight = int(tight.stats.forward.iterations.max())
    assert it_tight > 4 * it_loose
    assert b_tight == b_loose
    assert b_tight * 10 < saved_tensor_bytes(lambda: unrolled(cell, x, torch.zeros_like(x), 100))


def test_fixed_point_functional_budget_and_default_z0():
    A, x = linear_pieces()
    g = lambda x, z: z @ A.T + x  # noqa: E731
    with pytest.raises(il.ConvergenceError, match="forward solve"):
        F.fixed_point(g, x, torch.zeros_like(x), solver=il.Picard(), max_iter=2)
    z = F.fixed_point(g, x, torch.zeros_like(x), solver=il.Picard(), tol=1e-3, max_iter=1000)
    z_star = torch.linalg.solve(torch.eye(5, dtype=D64) - A, x.mT).mT
    err = float((z - z_star).norm(dim=-1).max())
    assert 1e-8 < err < 1e-1  # loose tolerance honoured: close but not exact
    layer = il.DEQLayer(g)
    torch.testing.assert_close(layer(x), z_star, atol=1e-9, rtol=1e-9)  # z0 = zeros like x


def test_non_convergence_policy():
    A, x = linear_pieces(rho=0.99)
    x = x.requires_grad_()
    g = lambda x, z: z @ A.T + x  # noqa: E731
    with pytest.raises(il.ConvergenceError) as info:
        il.DEQLayer(g, solver=il.Picard(max_iter=3))(x)
    assert info.value.stats is not None and not info.value.stats.all_converged
    layer = il.DEQLayer(g, solver=il.Picard(max_iter=3), on_failure="warn")
    with pytest.warns(il.ConvergenceWarning) as caught:
        z = layer(x)
    messages = [str(w.message) for w in caught]
    assert any("did not converge" in m for m in messages)
    assert any("not an equilibrium" in m for m in messages)  # gradient taken off-equilibrium
    assert not layer.stats.forward.all_converged and z.shape == x.shape


def test_adjoint_non_convergence_raises_in_backward():
    A, x = linear_pieces(rho=0.99)
    x = x.requires_grad_()
    layer = il.DEQLayer(lambda x, z: z @ A.T + x,
                        adjoint=il.FixedPointAdjoint(il.Picard(max_iter=2)))
    z = layer(x)
    with pytest.raises(il.ConvergenceError, match="adjoint"):
        z.sum().backward()


def test_no_off_equilibrium_warning_when_converged_or_disabled():
    A, x = linear_pieces()
    x = x.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        il.DEQLayer(lambda x, z: z @ A.T + x)(x)
        loose = il.DEQLayer(lambda x, z: z @ A.T + x, solver=il.Picard(tol=1e-2, rtol=1e-2),
                            warn_residual=None)
        loose(x)
    with pytest.warns(il.ConvergenceWarning, match="not an equilibrium"):
        il.DEQLayer(lambda x, z: z @ A.T + x, solver=il.Picard(tol=1e-2, rtol=1e-2))(x)


def test_non_finite_iterates_stop_the_solve():
    x = torch.ones(2, 3, dtype=D64)
    with pytest.raises(il.ConvergenceError, match="non-finite"):
        il.DEQLayer(lambda x, z: torch.log(z - 1.0) + x)(x)  # log of negatives: NaN


def test_bad_input():
    cell = TanhCell(n=3)
    layer = il.DEQLayer(cell)
    with pytest.raises(ValueError, match="x"):
        layer(torch.tensor([[1.0, float("nan"), 0.0]], dtype=D64))
    with pytest.raises(ValueError, match="z0"):
        layer(torch.ones(1, 3, dtype=D64), torch.ones(1, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match="cell"):
        il.DEQLayer("not a cell")
    with pytest.raises(ValueError, match="warn_residual"):
        il.DEQLayer(cell, warn_residual=0.0)
    with pytest.raises(ValueError, match="on_failure"):
        il.DEQLayer(cell, on_failure="ignore")


def test_float32_module_training_step():
    torch.manual_seed(0)
    cell = TanhCell(n=8).float()
    layer = il.DEQLayer(cell)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, target = torch.randn(16, 8), torch.randn(16, 8).clamp(-0.5, 0.5)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert len(list(layer.parameters())) == 3 and layer.cell is cell


def test_deepcopy_keeps_residual_and_map_on_one_cell():
    cell = TanhCell(n=4)
    layer = copy.deepcopy(il.DEQLayer(cell))
    with torch.no_grad():
        layer.cell.W.mul_(0.5)  # the copy's cell only
    x = torch.randn(2, 4, dtype=D64)
    z = layer(x)
    torch.testing.assert_close(z, unrolled(layer.cell, x, torch.zeros_like(x)))
    z.sum().backward()
    assert isinstance(layer.cell.W, nn.Parameter) and layer.cell.W.grad is not None
    assert cell.W.grad is None


def test_backward_accumulates_into_the_cell_parameters():
    cell = TanhCell(n=4)
    layer = il.DEQLayer(cell)
    W = cell.W
    layer(torch.randn(2, 4, dtype=D64)).sum().backward()
    assert cell.W is W and W.grad is not None  # the module still holds its Parameter
