"""Nonlinear least squares as a layer: ``y*(x) = argmin_y ½‖r(x, y)‖²``.

An :class:`~implicit_layers.ImplicitLayer` whose residual is the gradient ``F = Jᵀr``
(``J = ∂r/∂y``) and whose ``∂F/∂y`` is the exact Hessian of ``½‖r‖²``:

    H = JᵀJ + S,   S = Σ_i r_i ∇²_y r_i      (the second-order term)

The implicit gradient is that of :mod:`~implicit_layers.layers.argmin` with this ``H``:
``w = H⁻¹ ȳ``, ``z̄ = −(∂F/∂z)ᵀ w``. The forward solvers (Gauss-Newton, Levenberg-Marquardt)
end with ``J`` at the solution; :class:`LeastSquaresAdjoint` factors ``JᵀJ`` once (Cholesky) and

* by default solves the exact system ``H w = ȳ`` by CG preconditioned with that
  factorization, the second-order term entering through Hessian-vector products. The first
  CG iterate is the Gauss-Newton solution ``(JᵀJ)⁻¹ȳ``; when ``S = 0`` — a zero residual at the
  solution, or ``r`` linear in ``y`` — it is exact and one product confirms it; when the
  residual at the solution is not small, further iterations add ``S``'s contribution.
* with ``second_order=False`` returns the Gauss-Newton solution alone: no product at all,
  exact only when ``S = 0``, an approximation otherwise (flagged in the stats).

A rank-deficient ``J`` at the solution makes ``JᵀJ`` singular and the minimizer non-unique:
:class:`~implicit_layers.SingularSystemError` names that cause.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from implicit_layers.core.adjoint import Adjoint
from implicit_layers.core.layer import ImplicitLayer, Inputs
from implicit_layers.layers.argmin import HessianAdjoint
from implicit_layers.solvers.base import RootSolver
from implicit_layers.solvers.least_squares.base import NormalEquations, SumOfSquares
from implicit_layers.solvers.least_squares.levenberg_marquardt import LevenbergMarquardt
from implicit_layers.stats import SolverStats


def normal_gradient(residual: Callable, x, y: Tensor) -> Tensor:
    """``Jᵀr``, the gradient of ``½‖r(x, y)‖²`` in ``y`` (one VJP of the residual, with the
    cotangent ``r``). Taken with ``torch.func.grad`` rather than by calling a ``vjp`` closure
    on ``r``: that closure escapes its transform level under ``vmap(jacrev(...))``."""
    return torch.func.grad(lambda v: 0.5 * residual(x, v).square().sum())(y)


class LeastSquaresAdjoint(Adjoint):
    """Solves ``H w = b`` for a least-squares layer, reusing the forward solver's final
    ``JᵀJ`` factorization (see the module docstring for the two modes).

    Args:
        second_order: True (default): exact, CG on ``H = JᵀJ + S`` preconditioned by
            ``(JᵀJ)⁻¹``; False: the Gauss-Newton solution ``(JᵀJ)⁻¹ b`` only.
        rtol, max_iter: CG's relative tolerance and iteration budget (see
            :class:`HessianAdjoint`).

    When the forward solver left no normal equations (a minimizer such as L-BFGS, or a solve
    under ``torch.func`` transforms) the exact Hessian system is solved by
    :class:`HessianAdjoint` instead.

    Raises:
        SingularSystemError: ``J`` is rank deficient at the solution.

    >>> import torch, implicit_layers as il
    >>> x = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    >>> r = lambda x, y: y[..., :1] ** 2 - x                      # a far-from-zero residual
    >>> layer = il.LeastSquaresLayer(r, adjoint=il.LeastSquaresAdjoint())
    >>> y = layer(x, torch.ones(1, dtype=torch.float64))         # y² = mean(x)
    >>> (g,) = torch.autograd.grad(y.sum(), x)
    >>> torch.allclose(g, 1 / (6 * y.detach()).expand(3)), layer.stats.backward.solver
    (True, 'GaussNewtonPCG')
    """

    def __init__(self, second_order: bool = True, rtol: float | None = None,
                 max_iter: int | None = None):
        self.second_order = bool(second_order)
        self._hessian = HessianAdjoint(rtol=rtol, max_iter=max_iter)

    def solve(self, lin, rhs: Tensor, transpose: bool) -> tuple[Tensor, SolverStats]:
        if not isinstance(lin.aux, NormalEquations):
            return self._hessian.solve(lin, rhs, transpose)
        fac = lin.aux.factorization()
        b = lin.flatten(rhs)
        if not self.second_order:
            stats = SolverStats.exact("GaussNewton", b.shape[:-1], device=b.device)
            stats.extra["approximation"] = True
            return fac.solve(b).reshape(rhs.shape), stats
        return self._hessian.cg_solve(lin, rhs, preconditioner=fac.solve, name="GaussNewtonPCG")

    def __repr__(self) -> str:
        return f"LeastSquaresAdjoint(second_order={self.second_order})"


class LeastSquaresLayer(ImplicitLayer):
    """``y* = argmin_y ½‖residual(x, y)‖²``, differentiable in ``x`` and the residual's
    parameters.

    Args:
        residual: ``(x, y) ↦ r``, shape ``(*batch, m...)`` with the batch dims of ``y`` in
            front; ``x`` is a Tensor or a tuple of Tensors. An ``nn.Module``'s parameters
            receive gradients. Samples must not interact.
        solver: :class:`~implicit_layers.LevenbergMarquardt` (default),
            :class:`~implicit_layers.GaussNewton`, or any minimizer (it sees ``½‖r‖²``).
        adjoint: default :class:`LeastSquaresAdjoint` (exact, second-order term included).
        event_ndim, on_failure, init: see :class:`~implicit_layers.ImplicitLayer`.

    >>> import torch, implicit_layers as il
    >>> t = torch.linspace(0, 2, 20, dtype=torch.float64)
    >>> data = (3 * torch.exp(-1.5 * t)).requires_grad_()
    >>> decay = lambda data, p: p[..., :1] * torch.exp(-p[..., 1:] * t) - data
    >>> p = il.LeastSquaresLayer(decay)(data, torch.ones(2, dtype=torch.float64))
    >>> p.detach().round(decimals=9)
    tensor([3.0000, 1.5000], dtype=torch.float64)
    >>> torch.autograd.grad(p[0], data)[0].shape                # how each datum moves p
    torch.Size([20])
    """

    def __init__(self, residual: Callable, solver: RootSolver | None = None,
                 adjoint: Adjoint | None = None, *, event_ndim: int = 1,
                 on_failure: str = "raise", init: Callable | None = None):
        if not callable(residual):
            raise ValueError("residual must be callable (x, y) -> residual vector r")
        super().__init__(functools.partial(normal_gradient, residual),
                         solver if solver is not None else LevenbergMarquardt(),
                         adjoint if adjoint is not None else LeastSquaresAdjoint(),
                         event_ndim=event_ndim, on_failure=on_failure, init=init,
                         objective=SumOfSquares(residual, event_ndim))

    def forward(self, x: Inputs, y0: Tensor | None = None) -> Tensor:
        """``argmin_y ½‖residual(x, y)‖²``, solved from ``y0`` (default ``init(x)``)."""
        return self._forward(x, y0)
