"""The least-norm shift that makes a QP's constraints feasible (the "phase one" problem).

    s* = argmin ½‖s‖²   s.t.   ∃x:  Ax = b + s_E,   l − s_L ≤ Gx ≤ u + s_U

(each side of each inequality row relaxed on its own, as proxsuite defines its closest
feasible QP on the one-sided form ``[−G; G] x ≤ [−l; u]``). The feasible shifts form a
nonempty polyhedron, so ``s*`` exists and is unique; ``s* = 0`` exactly when the constraints
are feasible. In the variables ``(x, s_E, s_U, s_L)`` it is the QP

    min ½‖(s_E, s_U, s_L)‖²   s.t.  [A −I 0 0] (…) = b,   [G 0 −I 0] (…) ≤ u,   [G 0 0 I] (…) ≥ l,

which is always feasible and bounded, so any QP solver here solves it. It serves twice: as
the decisive infeasibility test for samples whose interior point ran out of iterations
(an iterate far from a Farkas certificate can oscillate without forming one), and as the
first stage of the closest feasible QP (proxsuite's definition, ``QPLayer(infeasible=
"closest")``), whose constraints are the original ones shifted by ``s*``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.solvers.qp.base import QPStatus
from implicit_layers.solvers.qp.problem import QPProblem, inf_norm


def phase_one_data(Q: Tensor, A: Tensor, b: Tensor, G: Tensor, lower: Tensor, upper: Tensor):
    """``(Q₁, c₁, A₁, b₁, G₁, l₁, u₁)`` of the phase-one QP for flat batches (differentiable
    in ``A, b, G, l, u``: built with torch ops); its solution is ``(x, s_E, s_U, s_L)``."""
    B, n, p, m = Q.shape[0], Q.shape[-1], A.shape[-2], G.shape[-2]
    eye = lambda k: torch.eye(k, dtype=Q.dtype, device=Q.device).expand(B, k, k)  # noqa: E731
    zeros = Q.new_zeros
    N = n + p + 2 * m
    Q1 = torch.block_diag(zeros(n, n), torch.eye(p + 2 * m, dtype=Q.dtype, device=Q.device)).expand(B, N, N)
    A1 = torch.cat([A, -eye(p), zeros(B, p, 2 * m)], -1)
    G1 = torch.cat([torch.cat([G, zeros(B, m, p), -eye(m), zeros(B, m, m)], -1),
                    torch.cat([G, zeros(B, m, p), zeros(B, m, m), eye(m)], -1)], -2)
    inf = torch.full_like(lower, float("inf"))
    return (Q1, zeros(B, N), A1, b, G1, torch.cat([-inf, lower], -1), torch.cat([upper, inf], -1))


def least_shift(solver, problem: QPProblem) -> tuple[Tensor, Tensor]:
    """``(s*, solved)``: the least-norm shift ``(s_E, s_U, s_L)`` of each sample
    (``(B, p + 2m)``) and whether its phase-one solve succeeded."""
    n, p, m = problem.sizes
    P = problem
    data = phase_one_data(P.Q, P.A, P.b, P.G, P.lower, P.upper)
    sol = solver.solve(QPProblem.from_data(*data), detect_infeasibility=False)
    return sol.x[..., n:], sol.stats.converged


def infeasible(solver, problem: QPProblem, tol: float) -> Tensor:
    """Samples whose least-norm feasible shift is nonzero beyond the accuracy of its solve
    (ten times ``tol``, relative to the data)."""
    shift, solved = least_shift(solver, problem)
    lo, hi = problem.finite_bounds()
    scale = 1 + torch.maximum(inf_norm(problem.b), torch.maximum(inf_norm(lo), inf_norm(hi)))
    return solved & (inf_norm(shift) > 10 * tol * scale)


def mark_infeasible(solver, problem: QPProblem, status: Tensor, tol: float) -> None:
    """Samples that ran out of iterations or failed numerically and whose constraints are
    infeasible become ``INFEASIBLE`` (``status`` is updated in place)."""
    idx = ((status == QPStatus.MAX_ITER) | (status == QPStatus.NUMERICAL)).nonzero().squeeze(-1)
    if idx.numel():
        bad = infeasible(solver, problem.select(idx), tol)
        status[idx[bad]] = QPStatus.INFEASIBLE
