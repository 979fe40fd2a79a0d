"""Batched Gauss-Newton for ``min_y ½‖r(y)‖²`` with a per-sample backtracking line search."""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.solvers.base import RootProblem, SolveResult
from implicit_layers.solvers.least_squares.base import LeastSquaresSolver, Residuals, factor_normal_matrix
from implicit_layers.solvers.threads import single_threaded
from implicit_layers.stats import check_finite_iterate


class GaussNewton(LeastSquaresSolver):
    """Gauss-Newton: the step solves the normal equations ``JᵀJ δ = −Jᵀr`` (Cholesky); each
    sample halves its step until ``½‖r‖²`` decreases by ``c · t · (−Jᵀr · δ)`` (Armijo).

    Converges quadratically on zero-residual problems and linearly otherwise; it needs ``J`` of
    full column rank at every iterate (use :class:`~implicit_layers.LevenbergMarquardt` when
    it may not be). A sample stops when ``‖Jᵀr‖ ≤ tol + rtol · ‖Jᵀr(y₀)‖``. The final ``JᵀJ`` is
    left in ``SolveResult.aux`` for :class:`~implicit_layers.LeastSquaresAdjoint`.

    Args:
        tol, rtol, max_iter: see :class:`~implicit_layers.RootSolver` (``max_iter`` default 50).
        max_backtracks: step halvings per iteration before the sample stalls.
        armijo: the sufficient-decrease constant ``c``.

    Raises:
        SingularSystemError: ``J`` is rank deficient at an iterate (``JᵀJ`` singular).

    >>> import torch, implicit_layers as il
    >>> t = torch.linspace(0, 1, 5, dtype=torch.float64)
    >>> r = lambda data, p: p[..., :1] * torch.exp(-p[..., 1:] * t) - data   # a e^{-k t}
    >>> fit = il.LeastSquaresLayer(r, solver=il.GaussNewton())
    >>> fit(2 * torch.exp(-3 * t), torch.tensor([1.0, 1.0], dtype=torch.float64)).round(decimals=9)
    tensor([2., 3.], dtype=torch.float64)
    """

    name = "GaussNewton"
    default_max_iter = 50

    def __init__(self, tol=None, rtol=None, max_iter=None, max_backtracks: int = 30,
                 armijo: float = 1e-4):
        super().__init__(tol, rtol, max_iter)
        self.max_backtracks, self.armijo = int(max_backtracks), armijo

    def solve(self, problem: RootProblem, y0: Tensor) -> SolveResult:
        res, y, r, J, g, log = self.start(problem, y0)
        stalled = torch.zeros(res.B, dtype=torch.bool, device=y.device)
        for k in range(self.max_iter):
            active = log.active.reshape(res.B) & ~stalled
            if not bool(active.any()):
                break
            with single_threaded(y.device):
                step = -factor_normal_matrix(J, f"Gauss-Newton iteration {k + 1}").solve(g)
            y_new, moved = self._backtrack(res, y, r, g, step, active)
            stalled = stalled | (active & ~moved)
            y = torch.where(moved[:, None], y_new, y)
            check_finite_iterate(y, self.name, k + 1)
            r, J = res.linearize(y)
            g = self.gradient(r, J)
            log.update(res.unflat(g), active.reshape(log.res.shape))
        return self.finish(res, y, r, J, log, stalled=stalled)

    def _backtrack(self, res: Residuals, y, r, g, step, active) -> tuple[Tensor, Tensor]:
        """Per-sample ``t ∈ {1, ½, ¼, …}`` with sufficient decrease; returns the trial points
        and the mask of samples that found one."""
        slope = -(g * step).sum(-1)  # > 0: the decrease the linear model predicts per unit t
        slack = self.slack(r)
        t = torch.ones_like(slope)
        found = ~active
        y_best = y
        for _ in range(self.max_backtracks + 1):
            y_try = y + t[:, None] * step
            ok = ~found & (self.decrease(r, res.residual(y_try)) >= self.armijo * t * slope - slack)
            y_best = torch.where(ok[:, None], y_try, y_best)
            found = found | ok
            if bool(found.all()):
                break
            t = torch.where(found, t, t / 2)
        return y_best, found & active
