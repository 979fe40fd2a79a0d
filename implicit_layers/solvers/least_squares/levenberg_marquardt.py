"""Batched Levenberg-Marquardt with per-sample damping (Marquardt scaling, Nielsen's update)."""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.solvers.base import RootProblem, SolveResult
from implicit_layers.solvers.least_squares.base import LeastSquaresSolver
from implicit_layers.solvers.threads import single_threaded
from implicit_layers.stats import check_finite_iterate

_MAX_DAMPING = 1e16  # beyond this the step is below rounding: the sample has stalled


class LevenbergMarquardt(LeastSquaresSolver):
    """Levenberg-Marquardt: the step solves ``(JᵀJ + λ D) δ = −Jᵀr`` with ``D`` the largest
    diagonal of ``JᵀJ`` seen so far (scale invariant), and each sample keeps its own ``λ``.

    A step is taken when the actual decrease of ``½‖r‖²`` is at least ``1e-4`` of the decrease
    the model predicts, ``ρ = actual / predicted``; then ``λ ← λ · max(⅓, 1 − (2ρ − 1)³)``,
    otherwise ``λ ← λ · ν`` with ``ν`` doubling on each consecutive rejection (Nielsen, 1999).
    Damping keeps every step defined when ``J`` is rank deficient; the adjoint, which needs
    the undamped ``JᵀJ`` at the solution, then raises :class:`~implicit_layers.SingularSystemError`.
    A sample stops when ``‖Jᵀr‖ ≤ tol + rtol · ‖Jᵀr(y₀)‖``; a sample whose ``λ`` exceeds 1e16
    has stalled and is reported as not converged.

    Args:
        damping: the initial ``λ``.
        tol, rtol, max_iter: see :class:`~implicit_layers.RootSolver` (``max_iter`` default
            200 iterations, rejected steps included).

    >>> import torch, implicit_layers as il
    >>> r = lambda x, y: torch.stack([10 * (y[..., 1] - y[..., 0] ** 2), 1 - y[..., 0]], -1)
    >>> layer = il.LeastSquaresLayer(r)                       # Rosenbrock, in residual form
    >>> layer(torch.zeros(()).double(), torch.tensor([-1.2, 1.0]).double()).round(decimals=9)
    tensor([1., 1.], dtype=torch.float64)
    """

    name = "LevenbergMarquardt"
    default_max_iter = 200

    def __init__(self, damping: float = 1e-3, tol=None, rtol=None, max_iter=None):
        super().__init__(tol, rtol, max_iter)
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        self.damping = damping

    def solve(self, problem: RootProblem, y0: Tensor) -> SolveResult:
        res, y, r, J, g, log = self.start(problem, y0)
        lam = torch.full((res.B,), self.damping, dtype=y.dtype, device=y.device)
        nu = torch.full_like(lam, 2.0)
        scale = torch.zeros_like(y)
        stalled = torch.zeros(res.B, dtype=torch.bool, device=y.device)
        for k in range(self.max_iter):
            active = log.active.reshape(res.B) & ~stalled
            if not bool(active.any()):
                break
            diag = (J * J).sum(-2)
            scale = torch.maximum(scale, diag)
            floor = torch.finfo(y.dtype).eps * scale.amax(-1, keepdim=True)
            D = torch.maximum(scale, floor.clamp_min(torch.finfo(y.dtype).tiny))
            step, factored = self._step(J, g, lam[:, None] * D)
            Jstep = (J @ step.unsqueeze(-1)).squeeze(-1)
            predicted = -(g * step).sum(-1) - 0.5 * Jstep.square().sum(-1)
            r_new = res.residual(y + step)
            actual = self.decrease(r, r_new)
            take = active & factored & torch.isfinite(actual) & (
                actual >= 1e-4 * predicted - self.slack(r))
            rho = (actual / predicted).clamp(0.0, 1.0)
            lam = torch.where(take, lam * torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3),
                              torch.where(active, lam * nu, lam))
            nu = torch.where(take, 2.0, torch.where(active, (2 * nu).clamp(max=2.0**20), nu))
            stalled = stalled | (active & (lam > _MAX_DAMPING))
            y = torch.where(take[:, None], y + step, y)
            check_finite_iterate(y, self.name, k + 1)
            if bool(take.any()):
                r, J = res.linearize(y)
                g = self.gradient(r, J)
            log.update(res.unflat(g), active.reshape(log.res.shape))
        return self.finish(res, y, r, J, log, stalled=stalled, damping=lam)

    @staticmethod
    def _step(J: Tensor, g: Tensor, damping: Tensor) -> tuple[Tensor, Tensor]:
        """``−(JᵀJ + diag(damping))⁻¹ g`` and the mask of samples whose matrix factored (a
        failure counts as a rejected step: λ grows until it factors)."""
        A = J.mT @ J + torch.diag_embed(damping)
        with single_threaded(A.device):
            L, info = torch.linalg.cholesky_ex(A)
            factored = info == 0
            L = torch.where(factored[:, None, None], L, torch.eye(A.shape[-1], dtype=A.dtype,
                                                                   device=A.device))
            step = -torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
        return torch.where(factored[:, None], step, 0), factored

    def __repr__(self) -> str:
        return (f"LevenbergMarquardt(damping={self.damping}, tol={self.tol}, rtol={self.rtol}, "
                f"max_iter={self.max_iter})")
