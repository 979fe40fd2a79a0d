"""Functional forms of the layers: thin wrappers that build a layer and call it once."""

from __future__ import annotations

import copy

# --- core (issue 2) ---
from implicit_layers.layers.root_find import RootFindLayer
from implicit_layers.solvers.newton import Newton


def with_budget(solver, tol=None, max_iter=None):
    """A copy of ``solver`` with ``tol``/``max_iter`` overridden where given."""
    if tol is None and max_iter is None:
        return solver
    solver = copy.copy(solver)
    if tol is not None:
        solver.tol = solver.rtol = tol
    if max_iter is not None:
        solver.max_iter = max_iter
    return solver


def root_find(residual, x, y0, *, solver=None, adjoint=None, tol=None, max_iter=None,
              on_failure="raise", event_ndim=1):
    """Solve ``residual(x, y) = 0`` from ``y0``, differentiably in ``x``.

    ``tol`` sets both the absolute and relative tolerance of the solver (default: Newton's).
    See :class:`~implicit_layers.RootFindLayer` for the other arguments.

    >>> import torch
    >>> x = torch.tensor([4.0, 9.0], dtype=torch.float64)
    >>> root_find(lambda x, y: y * y - x, x, torch.ones(2, dtype=torch.float64))
    tensor([2., 3.], dtype=torch.float64)
    """
    solver = with_budget(solver if solver is not None else Newton(), tol, max_iter)
    layer = RootFindLayer(residual, solver, adjoint, event_ndim=event_ndim, on_failure=on_failure)
    return layer(x, y0)


# --- layers: equality QP (issue 3) ---
def eq_qp(Q, c, A, b, *, backend="auto"):
    """``min ½xᵀQx + cᵀx s.t. Ax = b`` -> ``(x, λ)``; see :class:`EqualityQPLayer`."""
    from implicit_layers.layers.eq_qp import EqualityQPLayer

    return EqualityQPLayer(backend)(Q, c, A, b)


# --- layers: Lyapunov (issue 4) ---
from implicit_layers.layers.lyapunov import discrete_lyapunov, lyapunov  # noqa: E402, F401
from implicit_layers.layers.sylvester import sylvester  # noqa: E402, F401
# --- layers: DEQ (issue 5) ---
from implicit_layers.layers.deq import DEQLayer  # noqa: E402
from implicit_layers.solvers.anderson import Anderson  # noqa: E402


def fixed_point(g, x, z0, *, solver=None, adjoint=None, tol=None, max_iter=None,
                on_failure="raise", event_ndim=1):
    """Solve ``z = g(x, z)`` from ``z0``, differentiably in ``x`` (implicit gradient).

    ``tol`` sets both the absolute and relative tolerance of the forward solver (default
    Anderson's). See :class:`~implicit_layers.DEQLayer` for the other arguments.

    >>> import torch
    >>> x = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    >>> z = fixed_point(lambda x, z: 0.5 * z + x, x, torch.zeros(1, 2, dtype=torch.float64))
    >>> torch.allclose(z, 2 * x)                     # z = 2 x
    True
    >>> torch.autograd.grad(z.sum(), x)[0]           # dz/dx = 1 / (1 − 0.5)
    tensor([[2., 2.]], dtype=torch.float64)
    """
    solver = with_budget(solver if solver is not None else Anderson(), tol, max_iter)
    layer = DEQLayer(g, solver, adjoint, event_ndim=event_ndim, on_failure=on_failure)
    return layer(x, z0)


# --- layers: QP (issue 7) ---
def qp(Q, c, A=None, b=None, G=None, h=None, *, solver=None, on_failure="raise"):
    """``(x, lam, mu)`` of ``min ½xᵀQx + cᵀx s.t. Ax = b, Gx ≤ h``; see :class:`QPLayer`."""
    from implicit_layers.layers.qp import QPLayer

    return QPLayer(solver=solver, on_failure=on_failure)(Q, c, A, b, G, h)
