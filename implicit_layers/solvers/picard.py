"""Damped Picard (fixed-point) iteration ``y ← (1 − β) y + β g(y)`` with ``g(y) = y + f(y)``."""

from __future__ import annotations

from implicit_layers.solvers.base import (
    FlatProblem,
    IterationLog,
    RootProblem,
    RootSolver,
    SolveResult,
    where_active,
)


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
        flat = FlatProblem(problem, y0)
        y = flat.y0_flat
        f = flat.g(y) - y
        log = IterationLog(self, flat, y, f)
        for k in range(1, self.max_iter + 1):
            if log.finished:
                break
            active = log.active
            y = where_active(active, y + self.damping * f, y)
            f = flat.g(y) - y
            log.update(y, f, active, k)
            flat.observe(k, y)
        return SolveResult(flat.result(y), log.stats())
