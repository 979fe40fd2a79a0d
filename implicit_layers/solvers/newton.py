"""Batched Newton's method with a per-sample backtracking line search."""

from __future__ import annotations

import torch

from implicit_layers.linalg.dense import LU
from implicit_layers.solvers.base import (
    FlatProblem,
    IterationLog,
    RootProblem,
    RootSolver,
    SolveResult,
    where_active,
    wide_norm,
)


class Newton(RootSolver):
    """Newton's method on the per-sample Jacobian blocks, damped by backtracking.

    Each iteration materializes ``∂f/∂y`` (``n`` batched VJPs), solves for the Newton step with a
    batched LU, and halves the step of each sample until ``‖f‖²`` decreases sufficiently (Armijo
    condition with constant ``c``). Suited to small and medium ``n`` per sample.

    Args:
        tol, rtol, max_iter: see :class:`RootSolver` (``max_iter`` default 50).
        max_backtracks: step halvings per iteration before the full step is taken anyway.
        armijo: sufficient-decrease constant ``c`` in ``(0, 1/2)``.

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
        if isinstance(max_backtracks, bool) or int(max_backtracks) != max_backtracks \
                or max_backtracks < 0:
            raise ValueError(f"max_backtracks must be an integer >= 0, got {max_backtracks!r}")
        if not 0.0 < armijo < 0.5:
            raise ValueError(f"armijo must lie in (0, 0.5), got {armijo!r}")
        self.max_backtracks, self.armijo = int(max_backtracks), armijo
        self._lu = LU()

    def solve(self, problem: RootProblem, y0) -> SolveResult:
        flat = FlatProblem(problem, y0)
        y = flat.y0_flat
        f = flat.f(y)
        log = IterationLog(self, flat, y, f)
        for k in range(1, self.max_iter + 1):
            if log.finished:
                break
            active = log.active
            fac = self._lu.factor(flat.jacobian(y), what=f"the Newton Jacobian at iteration {k}")
            y_new, f_new, evals = self._backtrack(flat, y, f, -fac.solve(f), log.res)
            y, f = where_active(active, y_new, y), where_active(active, f_new, f)
            log.update(y, f, active, k, evaluations=evals + flat.n)
            flat.observe(k, y)
        return SolveResult(flat.result(y), log.stats())

    def _backtrack(self, flat: FlatProblem, y, f, step, res):
        """Per-sample step sizes t ∈ {1, ½, ¼, …} with ‖f(y + t·step)‖² ≤ (1 − 2ct)‖f(y)‖².

        Every trial is evaluated for the whole batch; the first acceptable trial of each sample
        is kept."""
        t = torch.ones_like(res, dtype=y.dtype)
        accepted = torch.zeros_like(res, dtype=torch.bool)
        y_best, f_best = y, f
        evals = 0
        for _ in range(self.max_backtracks + 1):
            y_try = y + t.unsqueeze(-1) * step
            f_try = flat.f(y_try)
            evals += 1
            # ratio form: (‖f_try‖ / ‖f‖)² ≤ 1 − 2ct cannot overflow
            ratio = wide_norm(f_try) / res.clamp_min(torch.finfo(res.dtype).tiny)
            ok = ~accepted & (ratio * ratio <= 1 - 2 * self.armijo * t)
            y_best = torch.where(ok.unsqueeze(-1), y_try, y_best)
            f_best = torch.where(ok.unsqueeze(-1), f_try, f_best)
            accepted = accepted | ok
            if bool(accepted.all()):
                return y_best, f_best, evals
            t = torch.where(accepted, t, t / 2)
        # no sufficient decrease for some samples: keep their shortest trial step
        keep = accepted.unsqueeze(-1)
        return torch.where(keep, y_best, y_try), torch.where(keep, f_best, f_try), evals
