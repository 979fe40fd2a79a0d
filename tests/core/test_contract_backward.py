"""Observation 3 of issue 13: the backward checks its result.

A fixed point whose Jacobian is not finite (``z = ½√|z| + x`` at its fixed point ``z = 0``,
where ``d√|z|/dz`` is infinite) returned NaN gradients without a word. Now every adjoint
reports it as a library error that names the layer, and the generic check catches a
non-finite gradient from a finite cotangent (``ConvergenceError``); ``check_gradients=False``
turns that last check off.
"""

import pytest
import torch

import implicit_layers as il
from implicit_layers import functional as F
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)

DT = torch.float64


def _sqrt_cell(x, z):
    return 0.5 * torch.sqrt(z.abs()) + x


ADJOINTS = {
    "default": None,  # FixedPointAdjoint(Anderson())
    "direct": il.DirectAdjoint(),
    "krylov": il.KrylovAdjoint(),
    "phantom": il.PhantomAdjoint(),
}


@pytest.mark.parametrize("adjoint", ADJOINTS.values(), ids=ADJOINTS.keys())
def test_non_finite_jacobian_at_the_fixed_point_is_an_error_naming_the_layer(adjoint):
    x = torch.zeros(2, 3, dtype=DT, requires_grad=True)
    z = il.DEQLayer(_sqrt_cell, adjoint=adjoint)(x, torch.zeros(2, 3, dtype=DT))
    assert torch.equal(z.detach(), torch.zeros(2, 3, dtype=DT))  # the forward is fine
    with pytest.raises(il.ImplicitLayerError, match="^DEQLayer: ") as info:
        z.sum().backward()
    assert isinstance(info.value, (il.ConvergenceError, il.SingularSystemError))


@pytest.mark.parametrize("solver", [il.Newton(), il.Broyden()], ids=repr)
def test_root_find_at_a_non_differentiable_root_names_the_layer(solver):
    x = torch.zeros(3, dtype=DT, requires_grad=True)
    with pytest.raises(il.ImplicitLayerError, match="^RootFindLayer: .*NaN/Inf"):
        y = F.root_find(lambda x, z: _sqrt_cell(x, z) - z, x, torch.zeros(3, dtype=DT),
                        solver=solver)
        torch.autograd.grad(y.sum(), x)


def _sqrt_input_layer():
    """``y = √x``: ∂f/∂y = I is fine, but ∂f/∂x = −1/(2√x) is infinite at x = 0."""
    return il.RootFindLayer(lambda x, y: y - torch.sqrt(x), event_ndim=0)


def test_infinite_input_derivative_raises_convergence_error():
    x = torch.tensor([0.0, 4.0], dtype=DT, requires_grad=True)
    y = _sqrt_input_layer()(x, torch.ones(2, dtype=DT))
    with pytest.raises(il.ConvergenceError, match="RootFindLayer: the backward produced NaN/Inf"):
        y.sum().backward()


def test_check_gradients_false_opts_out():
    layer = _sqrt_input_layer()
    layer.check_gradients = False
    x = torch.tensor([0.0, 4.0], dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x, torch.ones(2, dtype=DT)).sum(), x)
    assert torch.isinf(g[0]) and g[1] == 0.25  # 1 / (2√x), unchecked


def test_non_finite_cotangent_is_passed_through_unchecked():
    """Only a non-finite gradient from a *finite* cotangent is the layer's fault."""
    x = torch.tensor([1.0, 4.0], dtype=DT, requires_grad=True)
    y = _sqrt_input_layer()(x, torch.ones(2, dtype=DT))
    (g,) = torch.autograd.grad(y, x, torch.tensor([float("nan"), 1.0], dtype=DT))
    assert torch.isnan(g[0]) and g[1] == 0.25
