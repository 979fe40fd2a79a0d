"""One call of :class:`~implicit_layers.QPLayer`: its forward solve, residual and pullback.

:class:`QPForward` adapts a :class:`~implicit_layers.QPSolver` to the core's solver interface:
it flattens the broadcast batch, solves, keeps the solution's active set (the residual and
the pullback depend on it) and leaves the derivative factorization in ``SolveResult.aux``.
The residual and the closed-form pullback are derived in :mod:`implicit_layers.layers.qp.layer`.

The active set is part of the unknown: ``y = (x, λ, μ, σ)`` with ``σᵢ ∈ {−1, 0, 1}`` the
active side of row ``i`` (lower, none, upper) and the residual rows ``σ − round(σ)``, zero at
the solution, with derivative ``I`` in ``σ`` and ``0`` elsewhere (``round`` has derivative 0).
So the Jacobian is ``diag(K, I)`` and the residual and pullback are pure functions of the
layer's tensors: under ``vmap``, ``jacrev``, ``jacfwd`` and their compositions each level sees
its own samples' active sets (a mask held beside the tensors would be the physical batch's).
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.core.broadcast import outer_sum, sum_to
from implicit_layers.linalg.base import Factorization
from implicit_layers.linalg.kkt.inequality import mv
from implicit_layers.solvers.base import SolveResult
from implicit_layers.solvers.qp import QPSolver, QPStatus
from implicit_layers.solvers.qp.active_set import ActiveSetKKT
from implicit_layers.solvers.qp.problem import QPProblem
from implicit_layers.stats import SolverStats

ADVICE = {
    QPStatus.INFEASIBLE: "infeasible (no x satisfies the constraints; pass infeasible='closest' "
                         "to solve the closest feasible QP)",
    QPStatus.UNBOUNDED: "unbounded (the objective decreases without bound along a feasible "
                        "direction where Q is singular)",
    QPStatus.MAX_ITER: "not solved to tolerance within max_iter (raise max_iter or loosen tol)",
    QPStatus.NUMERICAL: "numerical failure (a factorization failed or an iterate overflowed: "
                        "is Q positive semidefinite? check also the data's scale and "
                        "conditioning)",
}


def split(y: Tensor, n: int, p: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, λ, μ)`` of ``(x, λ, μ)``."""
    return y[..., :n], y[..., n:n + p], y[..., n + p:]


def unknowns(x: Tensor, lam: Tensor, mu: Tensor, upper: Tensor, lower: Tensor) -> Tensor:
    """``y = (x, λ, μ, σ)`` with the active sides encoded as ``σ = upper − lower``."""
    return torch.cat([x, lam, mu, upper.to(x.dtype) - lower.to(x.dtype)], -1)


def parts(y: Tensor, n: int, p: int):
    """``(x, λ, μ, upper, lower, σ)`` of ``y = (x, λ, μ, σ)``."""
    m = (y.shape[-1] - n - p) // 2
    side = y[..., n + p + m:]
    return y[..., :n], y[..., n:n + p], y[..., n + p:n + p + m], side > 0.5, side < -0.5, side


def qp_residual(xs, y: Tensor) -> Tensor:
    """``F(θ, y)`` of the layer for ``y = (x, λ, μ, σ)``."""
    Q, c, A, b, G, lo, up = xs
    x, lam, mu, upper, lower, side = parts(y, c.shape[-1], A.shape[-2])
    active = upper | lower
    F1 = mv(Q, x) + c + mv(A.mT, lam) + mv(G.mT, torch.where(active, mu, 0.0))
    F2 = mv(A, x) - b
    Gx = mv(G, x)
    F3 = torch.where(upper, Gx - up, torch.where(lower, Gx - lo, -mu))
    return torch.cat([F1, F2, F3, side - side.round()], -1)


def qp_pullback(z, w: Tensor, wanted) -> dict[int, Tensor]:
    """``{i: θ̄_i}`` for θ = (Q, c, A, b, G, lower, upper) by the closed form."""
    Q, c, A, b, G, lo, up, y = z
    n, p = c.shape[-1], A.shape[-2]
    x, lam, mu, upper, lower, _ = parts(y, n, p)
    w1, w2, w3, _, _, _ = parts(w, n, p)
    active = upper | lower
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    out = {}
    if 0 in wanted:
        out[0] = outer_sum(torch.stack([w1, x], -1) * -0.5, torch.stack([x, w1], -1), Q.shape)
    if 1 in wanted:
        out[1] = sum_to(-w1, c.shape)
    if 2 in wanted:
        out[2] = outer_sum(torch.stack([lam, w2], -1).neg(), torch.stack([w1, x], -1), A.shape)
    if 3 in wanted:
        out[3] = sum_to(w2, b.shape)
    if 4 in wanted:
        out[4] = outer_sum(torch.stack([torch.where(active, mu, zero), torch.where(active, w3, zero)],
                                       -1).neg(), torch.stack([w1, x], -1), G.shape)
    if 5 in wanted:
        out[5] = sum_to(torch.where(lower, w3, zero), lo.shape)
    if 6 in wanted:
        out[6] = sum_to(torch.where(upper, w3, zero), up.shape)
    return out


class QPDerivative(Factorization):
    """An :class:`~implicit_layers.solvers.qp.active_set.ActiveSetKKT` as the factorization of
    the layer's Jacobian ``diag(K, I)`` on stacked vectors ``(*extra, *batch, n + p + 2m)``
    (``K`` is symmetric: the transposed solve is the same solve)."""

    def __init__(self, fac: ActiveSetKKT, batch, sizes: tuple[int, int, int], degenerate: Tensor):
        self.fac, self.batch, self.sizes, self.degenerate = fac, tuple(batch), sizes, degenerate
        self.stats = None

    def solve(self, b: Tensor, transpose: bool = False) -> Tensor:
        n, p, m = self.sizes
        extra = b.shape[: b.ndim - len(self.batch) - 1]
        flat = b.reshape(*extra, -1, n + p + 2 * m)
        z = torch.cat([*self.fac.solve(*split(flat[..., :n + p + m], n, p)), flat[..., n + p + m:]], -1)
        singular = self.fac.singular.reshape(self.batch)
        self.stats = SolverStats.exact("active-set KKT", self.batch, device=b.device)
        self.stats.extra["degenerate"] = singular | self.degenerate
        return z.reshape(b.shape)


class QPForward:
    """The forward solver of one layer call (see the module docstring).

    Attributes:
        infeasible_samples: the flat indices of the infeasible samples, once solved.
    """

    def __init__(self, solver: QPSolver, infeasible: str):
        self.solver, self.infeasible = solver, infeasible
        self.name = solver.name
        self.infeasible_samples: Tensor | None = None

    def solve(self, problem, y0: Tensor) -> SolveResult:
        Q, c, A, b, G, lower, upper = problem.data
        batch = y0.shape[:-1]
        B = batch.numel()
        n, p, m = c.shape[-1], A.shape[-2], G.shape[-2]

        def flat(t: Tensor, event: int) -> Tensor:
            ev = t.shape[t.ndim - event:]
            return t.expand(*batch, *ev).reshape(B, *ev)

        qp = QPProblem.from_data(flat(Q, 2), flat(c, 1), flat(A, 2), flat(b, 1), flat(G, 2),
                                 flat(lower, 1), flat(upper, 1))
        sol = self.solver.solve(qp)
        self.infeasible_samples = (sol.status == QPStatus.INFEASIBLE).nonzero().squeeze(-1)
        if self.infeasible == "closest":  # the layer solves these again, shifted: not failures
            sol.stats.converged = sol.stats.converged | (sol.status == QPStatus.INFEASIBLE)
        finite = lambda t: torch.where(torch.isfinite(t), t, 0.0)  # noqa: E731
        fac = sol.derivative
        y = unknowns(finite(sol.x), finite(sol.lam), finite(sol.mu), fac.upper.reshape(B, m),
                     fac.lower.reshape(B, m)).reshape(*batch, -1)
        stats = _reshaped(sol.stats, batch)
        stats.solver = self.solver.name
        stats.extra["failure"] = _failure_message(sol.status, self.solver.name)
        degenerate = stats.extra.get("degenerate", torch.zeros(batch, dtype=torch.bool, device=y.device))
        return SolveResult(y, stats, QPDerivative(fac, batch, (n, p, m), degenerate))


def _reshaped(stats: SolverStats, batch) -> SolverStats:
    for name in ("iterations", "residual", "converged"):
        setattr(stats, name, getattr(stats, name).reshape(batch))
    stats.extra = {k: v.reshape(tuple(batch) + tuple(v.shape[1:])) if isinstance(v, Tensor) and v.ndim else v
                   for k, v in stats.extra.items()}
    return stats


def _failure_message(status: Tensor, solver: str) -> str | None:
    failed = [(s, int((status == s).sum())) for s in ADVICE]
    if not any(k for _, k in failed):
        return None
    parts = [f"{k} {ADVICE[s]}" for s, k in failed if k]
    return f"({solver}: {'; '.join(parts)})" if parts else None
