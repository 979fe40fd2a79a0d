"""Phantom gradients and Jacobian-free backprop: they equal backprop through k damped steps
from the equilibrium (what they claim), approach the implicit gradient as k grows, and are
clearly not the implicit gradient for small k."""

import pytest
import torch

import implicit_layers as il
from tests.layers.test_deq import TanhCell

D64 = torch.float64
TIGHT = dict(tol=1e-13, rtol=1e-13)


def setup(seed=0):
    cell = TanhCell(n=5, rho=0.8, seed=seed)
    gen = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(3, 5, generator=gen, dtype=D64, requires_grad=True)
    v = torch.randn(3, 5, generator=gen, dtype=D64)
    return cell, x, v


def damped_steps_from(z_star, cell, x, k, tau):
    z = z_star.detach()
    for _ in range(k):
        z = (1 - tau) * z + tau * cell(x, z)
    return z


@pytest.mark.parametrize("k,tau", [(1, 1.0), (3, 0.6), (8, 1.0)])
def test_phantom_equals_backprop_through_damped_steps_from_equilibrium(k, tau):
    cell, x, v = setup()
    layer = il.DEQLayer(cell, solver=il.Anderson(**TIGHT), adjoint=il.PhantomAdjoint(k, tau))
    z = layer(x)
    wrt = (x, *cell.parameters())
    got = torch.autograd.grad((z * v).sum(), wrt)
    ref = torch.autograd.grad((damped_steps_from(z, cell, x, k, tau) * v).sum(), wrt)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10)
    st = layer.stats.backward
    assert st.extra["approximation"] and st.evaluations == k - 1
    assert torch.equal(st.iterations, torch.full((3,), k))


def test_phantom_forward_mode_equals_jvp_of_damped_steps():
    cell, x, _ = setup(1)
    x = x.detach()
    dx = torch.randn_like(x)
    layer = il.DEQLayer(cell, solver=il.Anderson(**TIGHT), adjoint=il.PhantomAdjoint(4, 0.7))
    _, dz = torch.func.jvp(lambda x: layer(x), (x,), (dx,))
    z_star = layer(x).detach()
    _, dz_ref = torch.func.jvp(lambda x: damped_steps_from(z_star, cell, x, 4, 0.7), (x,), (dx,))
    torch.testing.assert_close(dz, dz_ref, atol=1e-11, rtol=1e-10)


def test_jacobian_free_is_one_vjp_through_the_cell():
    cell, x, v = setup(2)
    layer = il.DEQLayer(cell, solver=il.Anderson(**TIGHT), adjoint=il.JacobianFreeAdjoint())
    z = layer(x)
    got = torch.autograd.grad((z * v).sum(), (x, cell.W))
    ref = torch.autograd.grad((cell(x, z.detach()) * v).sum(), (x, cell.W))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-11)
    assert layer.stats.backward.evaluations == 0
    assert repr(il.JacobianFreeAdjoint()) == "JacobianFreeAdjoint()"


def test_phantom_approaches_implicit_gradient_and_differs_for_small_k():
    cell, x, v = setup(3)
    exact = il.DEQLayer(cell, solver=il.Anderson(**TIGHT),
                        adjoint=il.FixedPointAdjoint(il.Anderson(**TIGHT)))
    (g_exact,) = torch.autograd.grad((exact(x) * v).sum(), x)
    errors = []
    for k in (1, 5, 150):
        layer = il.DEQLayer(cell, solver=il.Anderson(**TIGHT), adjoint=il.PhantomAdjoint(k))
        (g,) = torch.autograd.grad((layer(x) * v).sum(), x)
        errors.append(float((g - g_exact).norm() / g_exact.norm()))
    assert errors[0] > 1e-2 and errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-9


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"k": 1.5}, {"damping": 0.0}, {"damping": 2.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        il.PhantomAdjoint(**kwargs)
