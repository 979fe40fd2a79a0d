"""Batched Newton's method with a per-sample backtracking line search."""

from __future__ import annotations

import torch

from implicit_layers.linalg.dense import LU
from implicit_layers.solvers.base import (
    IterationLog,
    RootProblem,
    RootSolver,
    SolveResult,
    where_active,
)
from implicit_layers.stats import check_finite_iterate


class Newton(RootSolver):
    """Newton's method on the per-sample Jacobian blocks, damped by backtracking.

    Each iteration materializes ``∂f/∂y`` (``n`` batched VJPs), solves for the Newton step with a
    batched LU, and halves the step of each sample until ``‖f‖²`` decreases sufficiently (Armijo
    condition with constant ``c``). Suited to small and medium ``n`` per sample.

    Args:
        tol, rtol, max_iter: see :class:`RootSolver` (``max_iter`` default 50).
        max_backtracks: step halvings per iteration before the full step is taken anyway.
        armijo: sufficient-decrease constant ``c``.

    Raises:
        SingularSystemError: the Jacobian is singular at an iterate.

    >>> import torch
    >>> from implicit_layers.solvers.base import RootProblem
    >>> prob = RootProblem(lambda y: y ** 2 - 2.0)
    >>> Newton().solve(prob, torch.ones(1, dtype=torch.float64)).y
    tensor([1.4142], dtype=torch.float64)
    """

    name = "Newton"
    default_max_iter = 50

    def __init__(self, tol=None, rtol=None, max_iter=None, max_backtracks: int = 10,
                 armijo: float = 1e-4):
        super().__init__(tol, rtol, max_iter)
        self.max_backtracks, self.armijo = max_backtracks, armijo
        self._lu = LU()

    def solve(self, problem: RootProblem, y0) -> SolveResult:
        y, fy = y0, problem.residual(y0)
        log = IterationLog(self, problem, y, fy)
        e = problem.event_ndim
        for k in range(self.max_iter):
            active = log.active
            if not bool(active.any()):
                break
            J = problem.jacobian(y)
            fac = self._lu.factor(J, what=f"the Newton Jacobian at iteration {k + 1}")
            step = -fac.solve(problem.flatten(fy).reshape(*J.shape[:-1])).reshape(y.shape)
            y_new, f_new, evals = self._backtrack(problem, y, fy, step)
            check_finite_iterate(y_new, self.name, k + 1)
            y = where_active(active, y_new, y, e)
            fy = where_active(active, f_new, fy, e)
            log.update(y, fy, active, evaluations=evals + problem.flatten(y).shape[1])
        return SolveResult(y, log.stats())

    def _backtrack(self, problem, y, fy, step):
        """Per-sample step sizes t ∈ {1, ½, ¼, …} with ‖f(y + t·step)‖² ≤ (1 − 2ct)‖f(y)‖²."""
        e = problem.event_ndim
        merit = problem.norm(fy) ** 2
        t = torch.ones_like(merit)
        accepted = torch.zeros_like(merit, dtype=torch.bool)
        y_best, f_best = y, fy
        evals = 0
        for _ in range(self.max_backtracks + 1):
            shape = (*t.shape, *([1] * e))
            y_try = y + t.reshape(shape) * step
            f_try = problem.residual(y_try)
            evals += 1
            ok = ~accepted & (problem.norm(f_try) ** 2 <= (1 - 2 * self.armijo * t) * merit)
            y_best = where_active(ok, y_try, y_best, e)
            f_best = where_active(ok, f_try, f_best, e)
            accepted = accepted | ok
            if bool(accepted.all()):
                return y_best, f_best, evals
            t = torch.where(accepted, t, t / 2)
        # no sufficient decrease for some samples: keep their shortest trial step
        return where_active(accepted, y_best, y_try, e), where_active(accepted, f_best, f_try, e), evals
