"""The interface of the QP solvers behind :class:`~implicit_layers.QPLayer`.

A :class:`QPSolver` solves a flat batch of convex QPs

    min_x ½ xᵀQx + cᵀx   s.t.  Ax = b,  Gx ≤ h

and returns a :class:`QPSolution`: the primal-dual point, a per-sample :class:`QPStatus` and a
factorization of the derivative KKT system at that point, which the layer's backward and JVP
reuse.
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


@dataclass
class QPSolution:
    """What a QP solver returns for a flat batch ``(B,)``.

    ``status`` holds :class:`QPStatus` codes; ``factor`` is the KKT factorization at the
    returned point (``None`` for solvers without one); ``stats.converged = status == SOLVED``.
    """

    x: Tensor
    lam: Tensor
    mu: Tensor
    slack: Tensor
    status: Tensor
    stats: SolverStats
    factor: Any = None



class QPSolver(ABC):
    """Base of the QP solvers: :meth:`solve` a flat batch, and describe the derivative system.

    Subclasses set :attr:`name` and implement :meth:`solve` and :meth:`derivative_system`.

    >>> import torch, implicit_layers as il
    >>> Q, c = torch.eye(1, dtype=torch.float64)[None], torch.ones(1, 1, dtype=torch.float64)
    >>> none, G, h = Q.new_zeros(1, 0, 1), -Q, Q.new_zeros(1, 1)      # x ≥ 0
    >>> sol = il.InteriorPoint().solve(Q, c, none, none[..., 0], G, h)
    >>> isinstance(il.InteriorPoint(), il.QPSolver), il.QPStatus(int(sol.status[0])).name
    (True, 'SOLVED')
    """

    name = "qp"

    @abstractmethod
    def solve(self, Q: Tensor, c: Tensor, A: Tensor, b: Tensor, G: Tensor, h: Tensor) -> QPSolution:
        """Solve ``Q (B,n,n)``, ``c (B,n)``, ``A (B,p,n)``, ``b (B,p)``, ``G (B,m,n)``,
        ``h (B,m)``; never raises for a failed sample (its status says why)."""

    @staticmethod
    @abstractmethod
    def derivative_system(sol: QPSolution, G: Tensor, h: Tensor, x: Tensor, mu: Tensor):
        """``(G_eff, w, keep)`` of the derivative KKT matrix at the solution."""
