"""The forward-solver interface: a batched root problem and the solvers that attack it.

A :class:`RootProblem` is ``f(y) = 0`` for ``y`` of shape ``(*batch, *event)`` with independent
samples along the batch dimensions (the Jacobian is block diagonal, one ``n × n`` block per
sample, ``n = prod(event)``). Fixed-point solvers iterate the map ``g(y) = y + f(y)``; for a
deep-equilibrium residual ``f(x, z) = cell(x, z) − z`` that map is the cell itself.

A sample has converged when ``‖f(y)‖ ≤ tol + rtol · ‖y‖`` (2-norms over its event dims).
Converged samples are frozen while the rest of the batch iterates, so each sample reports its
own iteration count.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from implicit_layers.stats import SolverStats, check_finite_iterate


@dataclass
class RootProblem:
    """``f(y) = 0`` with per-sample independence along the leading (batch) dimensions.

    >>> import torch
    >>> prob = RootProblem(lambda y: y ** 2 - 1.0)
    >>> prob.jacobian(torch.tensor([[1.0, 2.0]]))       # one sample, 2 unknowns
    tensor([[[2., 0.],
             [0., 4.]]])

    Args:
        residual: ``y ↦ f(y)``, returns a tensor shaped like ``y``.
        event_ndim: how many trailing dims of ``y`` form one sample's unknown.
        fixed_point_map: optional ``g(y)``, equal to ``y + f(y)``, when it is cheaper or more
            accurate to evaluate directly (a DEQ cell); defaults to ``y + f(y)``.
        objective: optional ``y ↦ φ(y)``, one value per sample (shape = batch shape), whose
            gradient in ``y`` is the residual: minimizers descend it (an argmin layer).
        data: the layer's inputs, for solvers of structured problems (a QP solver reads
            ``Q, c, A, b, ...`` from it); generic solvers ignore it.
    """

    residual: Callable[[Tensor], Tensor]
    event_ndim: int = 1
    fixed_point_map: Callable[[Tensor], Tensor] | None = None
    objective: Callable[[Tensor], Tensor] | None = None
    data: tuple[Tensor, ...] = ()

    def g(self, y: Tensor) -> Tensor:
        if self.fixed_point_map is not None:
            return self.fixed_point_map(y)
        return y + self.residual(y)

    def batch_shape(self, y: Tensor) -> torch.Size:
        return y.shape[: y.ndim - self.event_ndim]

    def flatten(self, y: Tensor) -> Tensor:
        """``(*batch, *event) → (B, n)``."""
        return y.reshape(self.batch_shape(y).numel(), -1)

    def norm(self, t: Tensor) -> Tensor:
        """Per-sample 2-norm over the event dims (shape = batch shape)."""
        if self.event_ndim == 0:
            return t.abs()
        return torch.linalg.vector_norm(t, dim=tuple(range(-self.event_ndim, 0)))

    def jacobian(self, y: Tensor) -> Tensor:
        """Per-sample Jacobian blocks ``∂f/∂y`` of shape ``(*batch, n, n)``.

        Row ``j`` of every block comes from one VJP with the cotangent ``e_j`` in every sample
        (valid because samples are independent), so ``n`` batched VJPs suffice.
        """
        batch = self.batch_shape(y)
        n = y[(0,) * len(batch)].numel() if len(batch) else y.numel()
        fy, vjp_fn = torch.func.vjp(self.residual, y)
        if fy.shape != y.shape:
            raise ValueError(f"residual returned shape {tuple(fy.shape)}, expected {tuple(y.shape)}")
        eye = torch.eye(n, dtype=y.dtype, device=y.device)
        basis = eye.reshape(n, *([1] * len(batch)), *y.shape[len(batch):]).expand(n, *y.shape)
        (rows,) = torch.func.vmap(vjp_fn)(basis)  # (n, *batch, *event): rows[j] = e_jᵀ J
        return rows.reshape(n, *batch, n).movedim(0, -2)


@dataclass
class SolveResult:
    """What a forward solve returns: the solution, its stats, and optional reusable data
    (``aux``, e.g. a factorization at the solution that a custom adjoint can reuse).

    >>> import torch
    >>> from implicit_layers.solvers.picard import Picard
    >>> res = Picard().solve(RootProblem(lambda y: 0.5 * (1.0 - y)), torch.zeros(1))
    >>> round(float(res.y), 5), res.stats.all_converged
    (0.99998, True)"""

    y: Tensor
    stats: SolverStats
    aux: Any = None


class RootSolver(ABC):
    """Base of the forward solvers.

    Subclasses implement :meth:`solve`; the tolerances are shared:

    >>> import torch
    >>> from implicit_layers.solvers.newton import Newton
    >>> Newton(tol=1e-9).tolerances(torch.float64)[0]
    1e-09

    Args:
        tol: absolute tolerance on ``‖f(y)‖`` per sample (default ``eps**0.75`` of the dtype,
            about 1.8e-12 in float64 and 6.4e-6 in float32).
        rtol: relative tolerance, scaled by ``‖y‖`` (default: same as the default ``tol``).
        max_iter: iteration budget.
    """

    name = "solver"
    default_max_iter = 50

    def __init__(self, tol: float | None = None, rtol: float | None = None,
                 max_iter: int | None = None):
        self.tol, self.rtol = tol, rtol
        self.max_iter = max_iter if max_iter is not None else self.default_max_iter

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        default = torch.finfo(dtype).eps ** 0.75
        return (self.tol if self.tol is not None else default,
                self.rtol if self.rtol is not None else default)

    def converged(self, res_norm: Tensor, y_norm: Tensor, dtype: torch.dtype) -> Tensor:
        tol, rtol = self.tolerances(dtype)
        return res_norm <= tol + rtol * y_norm

    def with_budget(self, tol: float | None = None, max_iter: int | None = None) -> RootSolver:
        """A copy with ``tol`` (absolute and relative) and ``max_iter`` overridden where given."""
        if tol is None and max_iter is None:
            return self
        solver = copy.copy(self)
        if tol is not None:
            solver.tol = solver.rtol = tol
        if max_iter is not None:
            solver.max_iter = max_iter
        return solver

    @abstractmethod
    def solve(self, problem: RootProblem, y0: Tensor) -> SolveResult:
        """Solve ``problem`` from ``y0``; never raises for non-convergence (the caller applies
        the failure policy to the returned stats) but raises ``ConvergenceError`` on NaN/Inf."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tol={self.tol}, rtol={self.rtol}, max_iter={self.max_iter})"


class IterationLog:
    """Per-sample bookkeeping shared by iterative solvers: residual trace, iteration counts
    and the converged mask (samples are frozen once converged)."""

    def __init__(self, solver: RootSolver, problem: RootProblem, y: Tensor, fy: Tensor):
        if fy.shape != y.shape:
            raise ValueError(
                f"residual returned shape {tuple(fy.shape)}, expected y's shape {tuple(y.shape)}")
        check_finite_iterate(fy, solver.name, 0, "residual at the initial guess")
        self.solver, self.problem, self.dtype = solver, problem, y.dtype
        self.trace: list[Tensor] = []
        self.evaluations = 1
        self.res = problem.norm(fy)
        self.done = solver.converged(self.res, problem.norm(y), y.dtype)
        self.iterations = torch.zeros_like(self.res, dtype=torch.int64)
        self.trace.append(self.res)

    @property
    def active(self) -> Tensor:
        return ~self.done

    def update(self, y: Tensor, fy: Tensor, active: Tensor, evaluations: int = 1) -> None:
        """Record one iteration of the samples in ``active``."""
        check_finite_iterate(fy, self.solver.name, len(self.trace), "residual")
        self.evaluations += evaluations
        self.res = torch.where(active, self.problem.norm(fy), self.res)
        self.iterations = self.iterations + active.to(torch.int64)
        self.done = self.done | self.solver.converged(self.res, self.problem.norm(y), self.dtype)
        self.trace.append(self.res)

    def stats(self, **extra) -> SolverStats:
        return SolverStats(
            solver=self.solver.name,
            iterations=self.iterations,
            residual=self.res,
            converged=self.done,
            trace=torch.stack(self.trace),
            evaluations=self.evaluations,
            extra=extra,
        )


def where_active(active: Tensor, new: Tensor, old: Tensor, event_ndim: int) -> Tensor:
    """Take ``new`` for active samples and keep ``old`` for the frozen ones."""
    mask = active.reshape(*active.shape, *([1] * event_ndim))
    return torch.where(mask, new, old)
