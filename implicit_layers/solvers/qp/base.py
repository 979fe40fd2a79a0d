"""The interface of the QP solvers behind :class:`~implicit_layers.QPLayer`.

A :class:`QPSolver` solves a flat batch of convex QPs (a
:class:`~implicit_layers.solvers.qp.problem.QPProblem`)

    min_x ½ xᵀQx + cᵀx   s.t.  Ax = b,  l ≤ Gx ≤ u

and returns a :class:`QPSolution`: the primal-dual point (``μ`` signed: positive where the
upper bound is active, negative where the lower one is), a per-sample :class:`QPStatus`, and
the factorization of the derivative KKT system at that point
(:class:`~implicit_layers.solvers.qp.active_set.ActiveSetKKT`), which the layer's backward and
JVP reuse.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from torch import Tensor

from implicit_layers.stats import SolverStats


class QPStatus(IntEnum):
    """Per-sample outcome of a QP solve, stored as integer codes in the stats.

    ``CLOSEST_FEASIBLE``: the sample's constraints were infeasible and, under
    ``QPLayer(infeasible="closest")``, the QP with the least-norm feasible shift of its
    constraints was solved instead (a success).

    >>> import torch, implicit_layers as il
    >>> Q, c = torch.eye(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    >>> G = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    >>> h = torch.tensor([-1.0, -1.0], dtype=torch.float64)          # x ≤ −1 and x ≥ 1
    >>> layer = il.QPLayer(on_failure="warn")
    >>> with __import__("warnings").catch_warnings(record=True):
    ...     _ = layer(Q, c, None, None, G, h)
    >>> il.QPStatus(int(layer.stats.forward.extra["status"]))
    <QPStatus.INFEASIBLE: 2>
    """

    SOLVED = 0
    MAX_ITER = 1
    INFEASIBLE = 2
    UNBOUNDED = 3
    NUMERICAL = 4
    CLOSEST_FEASIBLE = 5


@dataclass
class QPSolution:
    """What a QP solver returns for a flat batch ``(B,)``.

    Attributes:
        x, lam, mu: the primal-dual point (``mu`` signed; zero on inactive constraints).
        status: :class:`QPStatus` codes; ``stats.converged = status == SOLVED``.
        stats: the solve's :class:`~implicit_layers.SolverStats` (``extra["status"]``).
        derivative: the factorization of the derivative KKT system at the point, or None.
    """

    x: Tensor
    lam: Tensor
    mu: Tensor
    status: Tensor
    stats: SolverStats
    derivative: Any = None

    def to(self, dtype) -> QPSolution:
        """The point and residuals in ``dtype``; the derivative factorization keeps its own
        (its solves convert right-hand sides and results)."""
        self.stats.residual = self.stats.residual.to(dtype)
        return QPSolution(self.x.to(dtype), self.lam.to(dtype), self.mu.to(dtype), self.status,
                          self.stats, self.derivative)


class QPSolver(ABC):
    """Base of the QP solvers: :meth:`solve` a flat batch of QPs.

    Subclasses set :attr:`name` and implement :meth:`solve`.

    >>> import torch, implicit_layers as il
    >>> from implicit_layers.solvers.qp.problem import QPProblem
    >>> Q, c = torch.eye(1, dtype=torch.float64)[None], torch.ones(1, 1, dtype=torch.float64)
    >>> none, G = Q.new_zeros(1, 0, 1), Q                                   # x ≥ 0
    >>> inf = torch.full((1, 1), float("inf"), dtype=torch.float64)
    >>> prob = QPProblem.from_data(Q, c, none, none[..., 0], G, torch.zeros(1, 1, dtype=torch.float64), inf)
    >>> sol = il.InteriorPoint().solve(prob)
    >>> isinstance(il.InteriorPoint(), il.QPSolver), il.QPStatus(int(sol.status[0])).name
    (True, 'SOLVED')
    """

    name = "qp"

    @abstractmethod
    def solve(self, problem, detect_infeasibility: bool = True) -> QPSolution:
        """Solve a :class:`~implicit_layers.solvers.qp.problem.QPProblem`; never raises for a
        failed sample (its status says why). With ``detect_infeasibility``, samples that end
        without a solution are checked for infeasible constraints
        (:mod:`~implicit_layers.solvers.qp.feasibility`)."""
