"""Limited-memory ("good") Broyden's method, batched, with a fixed memory budget."""

from __future__ import annotations

import torch
from torch import Tensor

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
        if isinstance(memory, bool) or int(memory) != memory or memory < 1:
            raise ValueError(f"memory must be a positive integer, got {memory!r}")
        self.memory, self.init = int(memory), init

    def solve(self, problem: RootProblem, y0) -> SolveResult:
        flat = FlatProblem(problem, y0)
        B, n = flat.B, flat.n
        y = flat.y0_flat
        f = flat.f(y)
        log = IterationLog(self, flat, y, f)
        if log.finished:
            return SolveResult(flat.result(y), log.stats())
        use_jac = self.init == "jacobian" or (self.init == "auto" and n <= 256)
        H0 = LU().factor(flat.jacobian(y), what="the Jacobian at y0") if use_jac else None
        U = y.new_zeros(B, n, 0)
        V = y.new_zeros(B, n, 0)

        def apply_H(v: Tensor, transpose: bool = False) -> Tensor:
            h0 = (H0.solve(v, transpose=transpose) if H0 is not None else -v)
            A, C = (V, U) if transpose else (U, V)
            return h0 + (A @ (C.mT @ v.unsqueeze(-1))).squeeze(-1)

        for k in range(1, self.max_iter + 1):
            if log.finished:
                break
            active = log.active
            s = where_active(active, -apply_H(f), 0.0)
            y_new = y + s
            f_new = flat.f(y_new)
            df = f_new - f
            # good Broyden: H ← H + (Δy − H Δf) (Δyᵀ H) / (Δyᵀ H Δf), skipped when the
            # denominator is negligible against ‖Δy‖ ‖H Δf‖ (norms scaled: no overflow)
            H_df = apply_H(df)
            denom = _bdot(s, H_df)
            size = wide_norm(s) * wide_norm(H_df)
            ok = (denom.abs() > torch.finfo(y.dtype).eps * size) & torch.isfinite(denom)
            if active is not None:
                ok &= active.squeeze(-1)
            scale = torch.where(ok, 1 / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
            u = (s - H_df) * scale.unsqueeze(-1)
            v = apply_H(s, transpose=True)
            U = torch.cat([U, u.unsqueeze(-1)], -1)[..., -self.memory:]
            V = torch.cat([V, v.unsqueeze(-1)], -1)[..., -self.memory:]
            y, f = where_active(active, y_new, y), where_active(active, f_new, f)
            log.update(y, f, active, k)
            flat.observe(k, y)
        return SolveResult(flat.result(y), log.stats())
