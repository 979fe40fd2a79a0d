"""The forward-solver interface: a batched root problem and the solvers that attack it.

A :class:`RootProblem` is ``f(y) = 0`` for ``y`` of shape ``(*batch, *event)`` with independent
samples along the batch dimensions (the Jacobian is block diagonal, one ``n × n`` block per
sample, ``n = prod(event)``). Fixed-point solvers iterate the map ``g(y) = y + f(y)``; for a
deep-equilibrium residual ``f(x, z) = cell(x, z) − z`` that map is the cell itself.

A sample has converged when ``‖f(y)‖ ≤ tol + rtol · ‖y‖`` (2-norms over its event dims, scaled
so that they overflow or underflow only when the norm itself is not representable) and both
norms are finite. Converged samples are frozen while the rest of the batch iterates, so each
sample reports its own iteration count. Iterative solvers read one value from the device per
iteration (:meth:`IterationLog.update`): whether every sample has converged, or whether some
residual or iterate became NaN/Inf, which stops the solve with a ``ConvergenceError``.
"""

from __future__ import annotations

import copy
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from implicit_layers.compat import func_vjp
from implicit_layers.errors import ConvergenceError
from implicit_layers.stats import SolverStats


def safe_norm(t: Tensor, dims: int | tuple[int, ...] = -1) -> Tensor:
    """2-norm over ``dims`` that overflows or underflows only when the norm itself does.

    Squaring entries directly overflows for ``|t| ≳ 1e19`` in float32 (``1e154`` in float64)
    and underflows for tiny ones. See :func:`wide_norm`; the result has ``t``'s dtype.

    >>> import torch
    >>> safe_norm(torch.tensor([[3e30, 4e30]]))        # float32: the squares overflow
    tensor([5.0000e+30])
    >>> safe_norm(torch.tensor([[3e300, 4e300]], dtype=torch.float64))
    tensor([5.0000e+300], dtype=torch.float64)
    """
    return wide_norm(t, dims).to(t.dtype)


def wide_norm(t: Tensor, dims: int | tuple[int, ...] = -1) -> Tensor:
    """The 2-norm of :func:`safe_norm` in float64: below float64 the squares are summed in
    float64, which holds them all; float64 itself is scaled, ``s · ‖t / s‖`` with
    ``s = max |t|``. NaN and Inf entries give a NaN or Inf norm."""
    if t.dtype != torch.float64:
        return torch.linalg.vector_norm(t, dim=dims, dtype=torch.float64)
    scale = t.abs().amax(dim=dims, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)
    return (torch.linalg.vector_norm(t / scale, dim=dims, keepdim=True) * scale).squeeze(dims)


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
        observer: optional ``(iteration, y) ↦ None``, called by the iterative solvers with each
            new iterate (``y`` shaped like ``y0``, not to be modified), e.g. to record the
            trajectory of a solve.
    """

    residual: Callable[[Tensor], Tensor]
    event_ndim: int = 1
    fixed_point_map: Callable[[Tensor], Tensor] | None = None
    objective: Callable[[Tensor], Tensor] | None = None
    data: tuple[Tensor, ...] = ()
    observer: Callable[[int, Tensor], None] | None = None

    def g(self, y: Tensor) -> Tensor:
        if self.fixed_point_map is not None:
            return self.fixed_point_map(y)
        return y + self.residual(y)

    def batch_shape(self, y: Tensor) -> torch.Size:
        return y.shape[: y.ndim - self.event_ndim]

    def flatten(self, y: Tensor) -> Tensor:
        """``(*batch, *event) → (B, n)``."""
        batch = self.batch_shape(y)
        return y.reshape(batch.numel(), math.prod(y.shape[len(batch):]))

    def norm(self, t: Tensor) -> Tensor:
        """Per-sample 2-norm over the event dims (shape = batch shape), overflow-safe."""
        if self.event_ndim == 0:
            return t.abs()
        return safe_norm(t, tuple(range(-self.event_ndim, 0)))

    def observe(self, iteration: int, y: Tensor) -> None:
        if self.observer is not None:
            self.observer(iteration, y)

    def jacobian(self, y: Tensor) -> Tensor:
        """Per-sample Jacobian blocks ``∂f/∂y`` of shape ``(*batch, n, n)``.

        Row ``j`` of every block comes from one VJP with the cotangent ``e_j`` in every sample
        (valid because samples are independent), so ``n`` batched VJPs suffice.
        """
        batch = self.batch_shape(y)
        n = math.prod(y.shape[len(batch):])
        fy, vjp_fn = func_vjp(self.residual, y)
        if fy.shape != y.shape:
            raise ValueError(f"residual returned shape {tuple(fy.shape)}, expected {tuple(y.shape)}")
        eye = torch.eye(n, dtype=y.dtype, device=y.device)
        basis = eye.reshape(n, *([1] * len(batch)), *y.shape[len(batch):]).expand(n, *y.shape)
        (rows,) = torch.func.vmap(vjp_fn)(basis)  # (n, *batch, *event): rows[j] = e_jᵀ J
        return rows.reshape(n, *batch, n).movedim(0, -2)


class FlatProblem:
    """A :class:`RootProblem` seen on ``(B, n)`` matrices, one row per sample: what the
    iterative solvers work on (``event_ndim = 0`` gives ``n = 1``). The residual and the map
    are checked to return ``y``'s shape.

    >>> import torch
    >>> flat = FlatProblem(RootProblem(lambda y: 1.0 - y, event_ndim=2), torch.zeros(3, 2, 2))
    >>> flat.B, flat.n, tuple(flat.f(torch.zeros(3, 4)).shape)
    (3, 4, (3, 4))
    """

    def __init__(self, problem: RootProblem, y0: Tensor):
        if y0.ndim < problem.event_ndim:
            raise ValueError(f"y0 has {y0.ndim} dims, fewer than event_ndim={problem.event_ndim}")
        self.problem, self.shape = problem, y0.shape
        self.batch_shape = problem.batch_shape(y0)
        self.B = self.batch_shape.numel()
        self.n = math.prod(y0.shape[len(self.batch_shape):])
        self.y0, self.y0_flat = y0, y0.reshape(self.B, self.n)

    def flat(self, y: Tensor) -> Tensor:
        return y.reshape(self.B, self.n)

    def result(self, v: Tensor) -> Tensor:
        """``v`` shaped like ``y0``; ``y0`` itself when the solve never moved from it."""
        return self.y0 if v is self.y0_flat else self.unflat(v)

    def unflat(self, v: Tensor) -> Tensor:
        return v.reshape(self.shape)

    def _checked(self, out: Tensor, what: str) -> Tensor:
        if out.shape != self.shape:
            raise ValueError(f"the {what} returned shape {tuple(out.shape)}, expected y's shape "
                             f"{tuple(self.shape)}")
        return out.reshape(self.B, self.n)

    def f(self, v: Tensor) -> Tensor:
        return self._checked(self.problem.residual(self.unflat(v)), "residual")

    def g(self, v: Tensor) -> Tensor:
        if self.problem.fixed_point_map is None:
            return v + self.f(v)
        return self._checked(self.problem.fixed_point_map(self.unflat(v)), "fixed-point map")

    def jacobian(self, v: Tensor) -> Tensor:
        return self.problem.jacobian(self.unflat(v)).reshape(self.B, self.n, self.n)

    def observe(self, iteration: int, v: Tensor) -> None:
        if self.problem.observer is not None:
            self.problem.observer(iteration, self.unflat(v))


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


def _check_tolerance(name: str, value: float | None) -> float | None:
    if value is not None and not (isinstance(value, numbers.Real) and 0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0 (or None), got {value!r}")
    return value


def _check_budget(value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {value!r}")
    return int(value)


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
        max_iter: iteration budget (0: only test the initial guess).

    Raises:
        ValueError: ``tol`` or ``rtol`` negative, NaN or infinite; ``max_iter`` negative or
            not an integer.
    """

    name = "solver"
    default_max_iter = 50

    def __init__(self, tol: float | None = None, rtol: float | None = None,
                 max_iter: int | None = None):
        self.tol, self.rtol = _check_tolerance("tol", tol), _check_tolerance("rtol", rtol)
        self.max_iter = _check_budget(max_iter if max_iter is not None else self.default_max_iter)

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        default = torch.finfo(dtype).eps ** 0.75
        return (self.tol if self.tol is not None else default,
                self.rtol if self.rtol is not None else default)

    def with_budget(self, tol: float | None = None, max_iter: int | None = None) -> RootSolver:
        """A copy with ``tol`` (absolute and relative) and ``max_iter`` overridden where given."""
        if tol is None and max_iter is None:
            return self
        solver = copy.copy(self)
        if tol is not None:
            solver.tol = solver.rtol = _check_tolerance("tol", tol)
        if max_iter is not None:
            solver.max_iter = _check_budget(max_iter)
        return solver

    @abstractmethod
    def solve(self, problem: RootProblem, y0: Tensor) -> SolveResult:
        """Solve ``problem`` from ``y0``; never raises for non-convergence (the caller applies
        the failure policy to the returned stats) but raises ``ConvergenceError`` on NaN/Inf."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tol={self.tol}, rtol={self.rtol}, max_iter={self.max_iter})"


class IterationLog:
    """Per-sample bookkeeping shared by iterative solvers on a :class:`FlatProblem`: residual
    norms and their trace, iteration counts and the converged mask (samples are frozen once
    converged).

    Each :meth:`update` (and the construction) reads one integer from the device, which says
    whether all samples have converged (:attr:`finished`) or some residual or iterate norm is
    not finite, in which case it raises ``ConvergenceError``. That is the only host-device
    synchronization per iteration of the solvers built on it. Norms are kept in float64
    (:func:`wide_norm`) and reported in the iterate's dtype.
    """

    def __init__(self, solver: RootSolver, flat: FlatProblem, y: Tensor, f: Tensor,
                 evaluations: int = 1):
        self.solver, self.flat, self.dtype = solver, flat, y.dtype
        self.tol, self.rtol = solver.tolerances(y.dtype)
        self.evaluations = evaluations
        self.res = wide_norm(f)
        self.y_norm = wide_norm(y)
        self.done = torch.zeros_like(self.res, dtype=torch.bool)
        self._stalled = torch.full_like(self.res, flat.B + 1, dtype=torch.int64)
        self._counted: list[Tensor] = []  # per-sample 0/1 of the iterations some sample skipped
        self._full = 0  # iterations in which every sample moved
        self.trace: list[Tensor] = [self.res]
        self.finished = self._poll(0, "residual at the initial guess")

    @property
    def active(self) -> Tensor | None:
        """Samples still iterating, as a ``(B, 1)`` mask for ``torch.where`` on flat rows, or
        None when all of them are (no sample has converged yet)."""
        return None if self.all_running else self._running.unsqueeze(-1)

    def update(self, y: Tensor, f: Tensor, active: Tensor | None, iteration: int,
               evaluations: int = 1) -> bool:
        """Record an iteration of the samples in ``active`` (``(B, 1)``, None for all; the
        others kept their ``y``); returns whether all samples have converged. Raises
        ``ConvergenceError`` on a non-finite residual or iterate."""
        self.evaluations += evaluations
        if active is None:
            self._full += 1
            self.res = wide_norm(f)
        else:
            moving = active.squeeze(-1)
            self._counted.append(moving)
            self.res = torch.where(moving, wide_norm(f), self.res)
        self.y_norm = wide_norm(y)
        self.trace.append(self.res)
        self.finished = self._poll(iteration, "residual")
        return self.finished

    def _poll(self, iteration: int, what: str) -> bool:
        # converged: ‖f‖ ≤ tol + rtol ‖y‖ with both norms finite (x < inf is False for NaN, inf)
        finite = torch.maximum(self.res, self.y_norm) < float("inf")
        self.done |= finite & (torch.sub(self.res, self.y_norm, alpha=self.rtol) <= self.tol)
        self._running = ~self.done
        # the one device read: the sum over samples of 0 (converged), 1 (running) or B + 1 (a
        # non-finite norm), which is 0 when all converged and B when all are running
        code = int(torch.where(finite, self._running, self._stalled).sum())
        if code > self.flat.B:
            raise ConvergenceError(
                f"{self.solver.name}: non-finite {what} at iteration {iteration} (NaN/Inf in "
                f"the iterate, the residual or their norms); the solve was stopped instead of "
                f"propagating NaN/Inf (check the residual's scale or damping)")
        self.all_running = code == self.flat.B > 0
        return code == 0

    @property
    def iterations(self) -> Tensor:
        count = torch.full_like(self.done, self._full, dtype=torch.int64)
        return count + torch.stack(self._counted).sum(0) if self._counted else count

    def stats(self, **extra) -> SolverStats:
        batch = self.flat.batch_shape
        return SolverStats(
            solver=self.solver.name,
            iterations=self.iterations.reshape(batch),
            residual=self.res.to(self.dtype).reshape(batch),
            converged=self.done.reshape(batch),
            trace=torch.stack(self.trace).to(self.dtype).reshape(len(self.trace), *batch),
            evaluations=self.evaluations,
            extra=extra,
        )


def where_active(active: Tensor | None, new: Tensor, old: Tensor | float) -> Tensor:
    """``new`` for the active rows (``(B, 1)`` mask; None = all), ``old`` for the frozen ones."""
    return new if active is None else torch.where(active, new, old)
