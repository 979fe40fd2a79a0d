"""Root finding as a layer: ``y = RootFindLayer(residual)(x, y0)`` solves ``residual(x, y) = 0``."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from implicit_layers.core.adjoint import Adjoint
from implicit_layers.core.layer import ImplicitLayer, Inputs
from implicit_layers.solvers.base import RootSolver
from implicit_layers.solvers.newton import Newton


class RootFindLayer(ImplicitLayer):
    """An :class:`~implicit_layers.ImplicitLayer` with Newton's method as the default solver.

    Args:
        residual: ``(x, y) ↦ f``; an ``nn.Module`` residual's parameters get gradients.
        solver: :class:`~implicit_layers.Newton` (default), :class:`~implicit_layers.Broyden`,
            :class:`~implicit_layers.ScipyRoot`, or any other root solver.
        adjoint, event_ndim, on_failure: see :class:`~implicit_layers.ImplicitLayer`.

    >>> import torch, implicit_layers as il
    >>> kepler = il.RootFindLayer(lambda x, E: E - 0.5 * torch.sin(E) - x)  # Kepler's equation
    >>> M = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    >>> E = kepler(M, M.detach().clone())
    >>> (dE,) = torch.autograd.grad(E.sum(), M)
    >>> torch.allclose(dE, 1 / (1 - 0.5 * torch.cos(E.detach())))
    True
    """

    def __init__(self, residual: Callable, solver: RootSolver | None = None,
                 adjoint: Adjoint | None = None, *, event_ndim: int = 1, on_failure: str = "raise"):
        super().__init__(residual, solver if solver is not None else Newton(), adjoint,
                         event_ndim=event_ndim, on_failure=on_failure)

    def forward(self, x: Inputs, y0: Tensor | None = None) -> Tensor:
        """``y`` with ``residual(x, y) = 0``, solved from ``y0``."""
        return self._forward(x, y0)
