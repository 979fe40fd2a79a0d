"""Anderson acceleration of the fixed-point map ``g(y) = y + f(y)`` (type II, difference form).

With residuals ``f_k = g(y_k) − y_k`` and the last ``m`` differences ``ΔF = [f_{i+1} − f_i]``,
``ΔY = [y_{i+1} − y_i]``, each step solves the small regularized least-squares problem

    γ = argmin ‖f_k − ΔF γ‖² + λ · s · ‖γ‖²,      s = mean diag(ΔFᵀΔF)

and moves to ``y_{k+1} = y_k + β f_k − (ΔY + β ΔF) γ`` (``β`` = damping; ``β = 1`` gives the
classic ``g(y_k) − ΔG γ``). Scaling the problem by ``c`` scales ``ΔFᵀΔF`` and ``s`` by ``c²``,
so ``γ`` — and the iteration — is unchanged: the regularization is scale invariant.

Safeguard: the normal equations are solved by a batched Cholesky. A sample whose system
fails to factor, or whose coefficients are not finite, takes a plain damped Picard step and
restarts its history (counted in ``stats.extra["restarts"]``); the solve never crashes on a
singular least-squares system.

The ``m × m`` systems are factored single-threaded on CPU: MKL's threaded LAPACK spends
~20 ms per call on tiny batched systems when the other cores are busy (measured on a loaded
2-core machine), 1000× the work itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.solvers.base import (
    IterationLog,
    RootProblem,
    RootSolver,
    SolveResult,
    where_active,
)
from implicit_layers.solvers.threads import single_threaded
from implicit_layers.stats import check_finite_iterate


class Anderson(RootSolver):
    """Anderson-accelerated fixed-point iteration, batched with per-sample stopping.

    Args:
        m: memory, the number of past differences used by each step.
        regularization: λ, relative to the mean squared norm of the stored residual
            differences (default ``sqrt(eps)`` of the dtype).
        damping: β in ``(0, 1]``, the weight of ``g`` in each mixing step.
        tol, rtol, max_iter: see :class:`RootSolver`.

    The stats record the per-sample residual trace, iteration counts, the converged mask, the
    number of batched map evaluations and, in ``extra["restarts"]``, how many safeguarded
    restarts each sample took.

    >>> import torch
    >>> from implicit_layers.solvers.base import RootProblem
    >>> prob = RootProblem(lambda y: torch.cos(y) - y)      # fixed point of cos
    >>> res = Anderson(m=3).solve(prob, torch.zeros(2, 1, dtype=torch.float64))
    >>> round(float(res.y[0, 0]), 6), bool(res.stats.all_converged)
    (0.739085, True)
    """

    name = "Anderson"
    default_max_iter = 100

    def __init__(self, m: int = 5, regularization: float | None = None, damping: float = 1.0,
                 tol=None, rtol=None, max_iter=None):
        super().__init__(tol, rtol, max_iter)
        if int(m) != m or m < 1:
            raise ValueError(f"m must be a positive integer, got {m}")
        if regularization is not None and not regularization >= 0.0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"damping must lie in (0, 1], got {damping}")
        self.m, self.regularization, self.damping = int(m), regularization, damping

    def solve(self, problem: RootProblem, y0: Tensor) -> SolveResult:
        shape, beta = y0.shape, self.damping
        y = y0
        gy = problem.g(y)
        check_finite_iterate(gy, self.name, 0, "map value")
        fy = gy - y
        log = IterationLog(self, problem, y, fy)
        y_flat, f_flat = problem.flatten(y), problem.flatten(fy)
        B, n = y_flat.shape
        history = _History(B, n, self.m, y.dtype, y.device)
        lam = self.regularization
        if lam is None:
            lam = torch.finfo(y.dtype).eps ** 0.5
        restarts = torch.zeros(B, dtype=torch.int64, device=y.device)
        for k in range(self.max_iter):
            active = log.active
            if not bool(active.any()):
                break
            gamma, broken = history.coefficients(f_flat, lam)
            restarts += broken & active.reshape(B)
            step = y_flat + beta * f_flat - history.combine(gamma)
            y_new = step.reshape(shape)
            check_finite_iterate(y_new, self.name, k + 1)
            y_new = where_active(active, y_new, y, problem.event_ndim)
            g_new = problem.g(y_new)
            check_finite_iterate(g_new, self.name, k + 1, "map value")
            f_new = g_new - y_new
            y_new_flat, f_new_flat = problem.flatten(y_new), problem.flatten(f_new)
            history.push(y_new_flat - y_flat, f_new_flat - f_flat, beta, reset=broken)
            y, fy, y_flat, f_flat = y_new, f_new, y_new_flat, f_new_flat
            log.update(y, fy, active)
        return SolveResult(y, log.stats(restarts=restarts.reshape(log.res.shape), memory=self.m))

    def __repr__(self) -> str:
        return (f"Anderson(m={self.m}, regularization={self.regularization}, "
                f"damping={self.damping}, tol={self.tol}, rtol={self.rtol}, "
                f"max_iter={self.max_iter})")


class _History:
    """Circular buffers of the last ``m`` residual differences ``ΔF`` and mixing directions
    ``D = ΔY + β ΔF``, with a per-sample mask of the valid columns (restarts clear it)."""

    def __init__(self, B: int, n: int, m: int, dtype: torch.dtype, device: torch.device):
        self.dF = torch.zeros(B, m, n, dtype=dtype, device=device)
        self.D = torch.zeros(B, m, n, dtype=dtype, device=device)
        self.valid = torch.zeros(B, m, dtype=torch.bool, device=device)
        self.slot, self.m = 0, m

    def coefficients(self, f: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        """Mixing coefficients ``γ`` (B, m) and the mask of samples whose system broke down."""
        B = f.shape[0]
        if not bool(self.valid.any()):  # empty history: a plain (damped) Picard step
            return f.new_zeros(B, self.m), torch.zeros(B, dtype=torch.bool, device=f.device)
        v = self.valid.to(f.dtype)
        gram = torch.bmm(self.dF, self.dF.mT) * (v.unsqueeze(-1) * v.unsqueeze(-2))
        rhs = torch.bmm(self.dF, f.unsqueeze(-1)).squeeze(-1) * v
        diag = gram.diagonal(dim1=-2, dim2=-1)
        scale = (diag.sum(-1) / v.sum(-1).clamp_min(1.0)).clamp_min(torch.finfo(f.dtype).tiny)
        # valid columns: λ·s on the diagonal; unused columns: a decoupled identity row (γ = 0)
        shift = lam * scale.unsqueeze(-1) * v + (1.0 - v) * scale.unsqueeze(-1)
        system = gram + torch.diag_embed(shift)
        with single_threaded(system.device):
            L, info = torch.linalg.cholesky_ex(system)
            gamma = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
        broken = (info > 0) | ~torch.isfinite(gamma).all(-1)
        gamma = torch.where(broken.unsqueeze(-1), torch.zeros_like(gamma), gamma * v)
        return gamma, broken

    def combine(self, gamma: Tensor) -> Tensor:
        """``Σ_i γ_i D_i`` per sample, shape (B, n)."""
        return torch.bmm(gamma.unsqueeze(-2), self.D).squeeze(-2)

    def push(self, dy: Tensor, df: Tensor, beta: float, reset: Tensor) -> None:
        """Store the newest differences; samples in ``reset`` drop their older columns."""
        self.valid = self.valid & ~reset.unsqueeze(-1)
        self.dF[:, self.slot] = df
        self.D[:, self.slot] = dy + beta * df
        self.valid[:, self.slot] = True
        self.slot = (self.slot + 1) % self.m
