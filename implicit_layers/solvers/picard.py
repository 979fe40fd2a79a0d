"""Damped Picard (fixed-point) iteration ``y ← (1 − β) y + β g(y)`` with ``g(y) = y + f(y)``."""

from __future__ import annotations

from implicit_layers.solvers.base import (
    IterationLog,
    RootProblem,
    RootSolver,
    SolveResult,
    where_active,
)
from implicit_layers.stats import check_finite_iterate


class Picard(RootSolver):
    """Plain fixed-point iteration, converging when ``g`` is a contraction.

    Args:
        damping: β in ``y ← (1 − β) y + β g(y)``; values below 1 help oscillating maps.
        tol, rtol, max_iter: see :class:`RootSolver`.

    >>> import torch
    >>> from implicit_layers.solvers.base import RootProblem
    >>> prob = RootProblem(lambda y: torch.cos(y) - y)      # fixed point of cos
    >>> round(float(Picard(max_iter=200).solve(prob, torch.zeros(1)).y), 4)
    0.7391
    """

    name = "Picard"
    default_max_iter = 200

    def __init__(self, damping: float = 1.0, tol=None, rtol=None, max_iter=None):
        super().__init__(tol, rtol, max_iter)
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"damping must lie in (0, 1], got {damping}")
        self.damping = damping

    def solve(self, problem: RootProblem, y0) -> SolveResult:
        y = y0
        gy = problem.g(y)
        log = IterationLog(self, problem, y, gy - y)
        for k in range(self.max_iter):
            active = log.active
            if not bool(active.any()):
                break
            y_new = y + self.damping * (gy - y)
            check_finite_iterate(y_new, self.name, k + 1)
            y = where_active(active, y_new, y, problem.event_ndim)
            gy = problem.g(y)
            log.update(y, gy - y, active)
        return SolveResult(y, log.stats())
