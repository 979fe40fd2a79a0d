"""Observation 1 of issue 13: samples that interact are detected, never differentiated as if
they were independent.

With ``event_ndim`` trailing dims per sample, a layer's backward factors one Jacobian block
per sample. A residual that mixes samples has off-diagonal blocks; the layer probes for them
(:mod:`implicit_layers.core.independence`) and raises a ``ValueError`` naming ``event_ndim``;
declared as one unknown, the same problem gets its exact gradient.
"""

import pytest
import torch
from torch.autograd.functional import jacobian

import implicit_layers as il
from implicit_layers import functional as F
from implicit_layers.core.independence import coupled_samples
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)

DT = torch.float64


def _coupling_matrix(n=5, norm=0.3):
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=DT)
    return norm * A / torch.linalg.matrix_norm(A, 2)


def test_rows_coupled_through_a_matrix_are_rejected():
    """The issue's example: Broyden converged and the gradient was 3.9 % wrong, silently."""
    A = _coupling_matrix()
    x = torch.randn(5, 3, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="event_ndim=2"):
        F.root_find(lambda x, y: A @ torch.tanh(y) + x - y, x, torch.zeros(5, 3, dtype=DT),
                    solver=il.Broyden())


def test_rows_coupled_through_a_matrix_get_the_exact_gradient_as_one_unknown():
    A = _coupling_matrix()
    x = torch.randn(5, 3, dtype=DT, requires_grad=True)
    residual = lambda x, y: A @ torch.tanh(y) + x - y  # noqa: E731
    solve = lambda x: F.root_find(residual, x, torch.zeros(5, 3, dtype=DT),  # noqa: E731
                                  solver=il.Broyden(tol=1e-13), event_ndim=2)
    y = solve(x)
    torch.testing.assert_close(residual(x, y), torch.zeros_like(y), atol=1e-12, rtol=0)
    # independent reference: the dense implicit function theorem on all 15 unknowns
    J_y = jacobian(lambda v: residual(x.detach(), v), y.detach()).reshape(15, 15)
    expected = -torch.linalg.solve(J_y, torch.eye(15, dtype=DT))  # ∂f/∂x = I
    got = torch.autograd.functional.jacobian(solve, x.detach()).reshape(15, 15)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(solve, (x,), fast_mode=True)


def test_x_times_y_minus_identity_rejects_rows_as_samples():
    X = torch.randn(4, 4, dtype=DT) + 4 * torch.eye(4, dtype=DT)
    residual = lambda X, Y: X @ Y - torch.eye(4, dtype=DT)  # noqa: E731
    with pytest.raises(ValueError, match="event_ndim"):
        F.root_find(residual, X, torch.zeros(4, 4, dtype=DT))
    Y = F.root_find(residual, X, torch.zeros(4, 4, dtype=DT), event_ndim=2)
    torch.testing.assert_close(Y, torch.linalg.inv(X), atol=1e-12, rtol=0)


class BatchNormCell(torch.nn.Module):
    def __init__(self, track_running_stats=True):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3, dtype=DT)
        self.bn = torch.nn.BatchNorm1d(3, dtype=DT, track_running_stats=track_running_stats)

    def forward(self, x, z):
        return 0.3 * torch.tanh(self.bn(self.lin(z))) + x


def _deq(cell, **kw):
    return il.DEQLayer(cell, il.Anderson(tol=1e-13), il.FixedPointAdjoint(il.Anderson(tol=1e-13)),
                       **kw)


def test_deq_with_batch_statistics_is_rejected_in_training_and_exact_in_eval_mode():
    torch.manual_seed(0)
    layer = _deq(BatchNormCell())
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="mixes samples"):
        layer(x)
    layer.eval()  # running statistics: each sample on its own, checked again in this mode
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,), fast_mode=True)
    layer.train()
    with pytest.raises(ValueError, match="mixes samples"):
        layer(x)


def test_batch_statistics_as_one_unknown():
    """Declared as one unknown, batch statistics are differentiated exactly (without running
    statistics); a module that updates its running statistics is named as the cause."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    layer = _deq(BatchNormCell(track_running_stats=False), event_ndim=2)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,), fast_mode=True)
    with pytest.raises(ValueError, match="in place.*track_running_stats"):
        _deq(BatchNormCell(), event_ndim=2)(x).sum().backward()


def test_probe_finds_a_single_coupled_pair_and_no_false_alarm():
    """Only sample 3 reads sample 4 (B = 6, not a power of two); an independent residual
    with nonlinear per-sample blocks passes."""
    y = torch.randn(6, 2, dtype=DT)

    def one_pair(y):
        out = y ** 3
        return torch.cat([out[:3], out[3:4] + 1e-3 * y[4:5], out[4:]])

    assert coupled_samples(one_pair, y, 1)
    assert not coupled_samples(lambda y: torch.tanh(y @ y.new_ones(2, 2)) * y, y, 1)
    assert not coupled_samples(lambda y: y.sum(-1, keepdim=True) * y, y.reshape(3, 2, 2), 2)
    assert coupled_samples(lambda y: y - y.mean(0), y.reshape(3, 2, 2), 2)


def test_independent_samples_pass_and_keep_exact_gradients():
    x = torch.randn(7, 3, dtype=DT, requires_grad=True)
    layer = il.RootFindLayer(lambda x, y: y ** 3 + y - x)
    assert torch.autograd.gradcheck(lambda x: layer(x, torch.zeros_like(x)), (x,), fast_mode=True)
