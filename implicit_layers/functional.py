"""Functional forms of the layers: thin wrappers that build a layer and call it once.

>>> import torch
>>> from implicit_layers import functional as F
>>> y = F.root_find(lambda x, y: y * y - x, torch.tensor([4.0], dtype=torch.float64),
...                 torch.ones(1, dtype=torch.float64))
>>> round(float(y), 12)
2.0
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from implicit_layers.core.adjoint import Adjoint
from implicit_layers.core.layer import Inputs
from implicit_layers.layers.argmin import ArgminLayer
from implicit_layers.layers.deq.layer import DEQLayer
from implicit_layers.layers.eq_qp.layer import EqualityQPBackend, EqualityQPLayer
from implicit_layers.layers.eq_qp.sparse import Matrix
from implicit_layers.layers.least_squares import LeastSquaresLayer
from implicit_layers.layers.lp_gradients import PerturbedLP, SmoothedLP
from implicit_layers.layers.lyapunov import discrete_lyapunov, lyapunov
from implicit_layers.layers.qp.layer import QPLayer
from implicit_layers.layers.root_find import RootFindLayer
from implicit_layers.layers.sylvester import sylvester
from implicit_layers.solvers.anderson import Anderson
from implicit_layers.solvers.base import RootSolver
from implicit_layers.solvers.least_squares import LevenbergMarquardt
from implicit_layers.solvers.minimize import LBFGS
from implicit_layers.solvers.newton import Newton
from implicit_layers.solvers.qp.base import QPSolver

__all__ = ["root_find", "fixed_point", "argmin", "least_squares", "eq_qp", "qp", "smoothed_lp",
           "perturbed_lp", "lyapunov",
           "discrete_lyapunov", "sylvester"]


def root_find(residual: Callable[..., Tensor], x: Inputs, y0: Tensor, *,
              solver: RootSolver | None = None, adjoint: Adjoint | None = None,
              tol: float | None = None, max_iter: int | None = None, on_failure: str = "raise",
              event_ndim: int = 1) -> Tensor:
    """Solve ``residual(x, y) = 0`` from ``y0``, differentiably in ``x``.

    ``tol`` sets both the absolute and relative tolerance of the solver (default: Newton's).
    See :class:`~implicit_layers.RootFindLayer` for the other arguments.

    >>> import torch
    >>> x = torch.tensor([4.0, 9.0], dtype=torch.float64)
    >>> root_find(lambda x, y: y * y - x, x, torch.ones(2, dtype=torch.float64))
    tensor([2., 3.], dtype=torch.float64)
    """
    solver = (solver if solver is not None else Newton()).with_budget(tol, max_iter)
    layer = RootFindLayer(residual, solver, adjoint, event_ndim=event_ndim, on_failure=on_failure)
    return layer(x, y0)


def fixed_point(g: Callable[..., Tensor], x: Inputs, z0: Tensor, *,
                solver: RootSolver | None = None, adjoint: Adjoint | None = None,
                tol: float | None = None, max_iter: int | None = None, on_failure: str = "raise",
                event_ndim: int = 1) -> Tensor:
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
    solver = (solver if solver is not None else Anderson()).with_budget(tol, max_iter)
    layer = DEQLayer(g, solver, adjoint, event_ndim=event_ndim, on_failure=on_failure)
    return layer(x, z0)


def argmin(objective: Callable[..., Tensor], x: Inputs, y0: Tensor, *,
           solver: RootSolver | None = None, adjoint: Adjoint | None = None,
           tol: float | None = None, max_iter: int | None = None, on_failure: str = "raise",
           event_ndim: int = 1) -> Tensor:
    """``argmin_y objective(x, y)`` from ``y0``, differentiably in ``x`` (implicit gradient).

    ``tol`` sets both the absolute and relative gradient tolerance of the solver (default
    L-BFGS's). See :class:`~implicit_layers.ArgminLayer` for the other arguments.

    >>> import torch
    >>> x = torch.tensor([1.0, 4.0], dtype=torch.float64, requires_grad=True)
    >>> y = argmin(lambda x, y: (y - x) ** 2 + y ** 4, x, torch.zeros(2, dtype=torch.float64),
    ...            event_ndim=0)                                  # 2(y − x) + 4y³ = 0
    >>> torch.allclose(torch.autograd.grad(y.sum(), x)[0], 2 / (2 + 12 * y.detach() ** 2))
    True
    """
    solver = (solver if solver is not None else LBFGS()).with_budget(tol, max_iter)
    layer = ArgminLayer(objective, solver, adjoint, event_ndim=event_ndim, on_failure=on_failure)
    return layer(x, y0)


def least_squares(residual: Callable[..., Tensor], x: Inputs, y0: Tensor, *,
                  solver: RootSolver | None = None, adjoint: Adjoint | None = None,
                  tol: float | None = None, max_iter: int | None = None,
                  on_failure: str = "raise", event_ndim: int = 1) -> Tensor:
    """``argmin_y ½‖residual(x, y)‖²`` from ``y0``, differentiably in ``x``.

    ``tol`` sets both the absolute and relative gradient tolerance of the solver (default
    Levenberg-Marquardt's). See :class:`~implicit_layers.LeastSquaresLayer`.

    >>> import torch
    >>> A = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    >>> y = least_squares(lambda b, y: y @ A.T - b, b, torch.zeros(2, dtype=torch.float64))
    >>> torch.allclose(y, torch.linalg.lstsq(A, b).solution)
    True
    """
    solver = (solver if solver is not None else LevenbergMarquardt()).with_budget(tol, max_iter)
    layer = LeastSquaresLayer(residual, solver, adjoint, event_ndim=event_ndim,
                              on_failure=on_failure)
    return layer(x, y0)


def eq_qp(Q: Matrix, c: Tensor, A: Matrix, b: Tensor, *,
          backend: EqualityQPBackend = "auto") -> tuple[Tensor, Tensor]:
    """``min ½xᵀQx + cᵀx s.t. Ax = b`` -> ``(x, λ)``; see :class:`EqualityQPLayer`."""
    return EqualityQPLayer(backend)(Q, c, A, b)


def qp(Q: Tensor, c: Tensor, A: Tensor | None = None, b: Tensor | None = None,
       G: Tensor | None = None, h: Tensor | None = None, *, solver: QPSolver | None = None,
       on_failure: str = "raise") -> tuple[Tensor, Tensor, Tensor]:
    """``(x, lam, mu)`` of ``min ½xᵀQx + cᵀx s.t. Ax = b, Gx ≤ h``; see :class:`QPLayer`."""
    return QPLayer(solver=solver, on_failure=on_failure)(Q, c, A, b, G, h)


def smoothed_lp(c: Tensor, A: Tensor | None = None, b: Tensor | None = None,
                G: Tensor | None = None, h: Tensor | None = None, *, gamma: float = 1.0,
                solver: QPSolver | None = None, on_failure: str = "raise") -> Tensor:
    """``argmin cᵀx + ½γ‖x‖² s.t. Ax = b, Gx ≤ h`` (exact QP gradient); see :class:`SmoothedLP`."""
    return SmoothedLP(gamma, solver=solver, on_failure=on_failure)(c, A, b, G, h)


def perturbed_lp(c: Tensor, A: Tensor | None = None, b: Tensor | None = None,
                 G: Tensor | None = None, h: Tensor | None = None, *, sigma: float = 1.0,
                 samples: int = 8, noise: Tensor | None = None,
                 generator: torch.Generator | None = None, seed: int = 0,
                 variance_reduction: bool = True, solver: QPSolver | None = None,
                 on_failure: str = "raise") -> Tensor:
    """``E[x*(c + σZ)]`` by Monte Carlo, with its perturbation gradient; see :class:`PerturbedLP`.

    Each call builds a fresh layer: with the same ``seed`` every call draws the same noise
    (common random numbers); pass a ``generator`` (or ``noise``) for fresh draws per call.
    """
    layer = PerturbedLP(sigma, samples, variance_reduction=variance_reduction, seed=seed,
                        generator=generator, solver=solver, on_failure=on_failure)
    return layer(c, A, b, G, h, noise=noise)
