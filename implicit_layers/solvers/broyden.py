"""Limited-memory ("good") Broyden's method, batched, with a fixed memory budget."""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.linalg.dense import LU
from implicit_layers.solvers.base import (
    IterationLog,
    RootProblem,
    RootSolver,
    SolveResult,
    where_active,
)
from implicit_layers.stats import check_finite_iterate


def _bdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


class Broyden(RootSolver):
    """Quasi-Newton root finding with an inverse-Jacobian estimate ``H = H₀ + U Vᵀ``.

    ``H₀`` is either the exact inverse Jacobian at the initial guess (``init="jacobian"``, one
    LU per solve; the method then converges in one step on linear problems) or ``−I``
    (``init="identity"``, matrix-free, the usual choice for deep equilibrium residuals
    ``f = g(y) − y`` whose Jacobian is close to ``−I``). ``"auto"`` takes the Jacobian when a
    sample has at most 256 unknowns. The rank-one updates live in ``memory`` columns; when the
    budget is full the oldest update is dropped, so memory stays ``O(memory · n)`` per sample.

    Args:
        memory: number of rank-one updates kept.
        init: ``"auto"``, ``"jacobian"`` or ``"identity"``.
        tol, rtol, max_iter: see :class:`RootSolver` (``max_iter`` default 100).

    >>> import torch
    >>> from implicit_layers.solvers.base import RootProblem
    >>> prob = RootProblem(lambda y: torch.tanh(0.5 * y) + 0.1 - y)
    >>> y = Broyden().solve(prob, torch.zeros(3, dtype=torch.float64)).y
    >>> float((torch.tanh(0.5 * y) + 0.1 - y).abs().max()) < 1e-10
    True
    """

    name = "Broyden"
    default_max_iter = 100

    def __init__(self, memory: int = 20, init: str = "auto", tol=None, rtol=None, max_iter=None):
        super().__init__(tol, rtol, max_iter)
        if init not in ("auto", "jacobian", "identity"):
            raise ValueError(f"init must be 'auto', 'jacobian' or 'identity', got {init!r}")
        if memory < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        self.memory, self.init = memory, init

    def solve(self, problem: RootProblem, y0) -> SolveResult:
        e = problem.event_ndim
        y, fy = y0, problem.residual(y0)
        log = IterationLog(self, problem, y, fy)
        B, n = problem.flatten(y).shape
        use_jac = self.init == "jacobian" or (self.init == "auto" and n <= 256)
        H0 = LU().factor(problem.jacobian(y).reshape(B, n, n), what="the Jacobian at y0") \
            if use_jac else None
        U = y.new_zeros(B, n, 0)
        V = y.new_zeros(B, n, 0)

        def apply_H(v: Tensor, transpose: bool = False) -> Tensor:
            h0 = (H0.solve(v, transpose=transpose) if H0 is not None else -v)
            A, C = (V, U) if transpose else (U, V)
            return h0 + (A @ (C.mT @ v.unsqueeze(-1))).squeeze(-1)

        for k in range(self.max_iter):
            active = log.active
            if not bool(active.any()):
                break
            f_flat = problem.flatten(fy)
            s = -apply_H(f_flat) * active.reshape(B, 1)
            y_new = y + s.reshape(y.shape)
            check_finite_iterate(y_new, self.name, k + 1)
            f_new = problem.residual(y_new)
            dy = s
            df = problem.flatten(f_new) - f_flat
            # good Broyden: H ← H + (Δy − H Δf) (Δyᵀ H) / (Δyᵀ H Δf)
            H_df = apply_H(df)
            denom = _bdot(dy, H_df)
            ok = (denom.abs() > torch.finfo(y.dtype).eps * dy.norm(dim=-1) * H_df.norm(dim=-1)) \
                & active.reshape(B)
            scale = torch.where(ok, 1 / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
            u = (dy - H_df) * scale[:, None]
            v = apply_H(dy, transpose=True)
            U = torch.cat([U, u[..., None]], -1)[..., -self.memory :]
            V = torch.cat([V, v[..., None]], -1)[..., -self.memory :]
            y = where_active(active, y_new, y, e)
            fy = where_active(active, f_new, fy, e)
            log.update(y, fy, active)
        return SolveResult(y, log.stats())
