"""QP solvers: the :class:`QPSolver` interface, a batched interior point and OSQP."""

from implicit_layers.solvers.qp.base import QPSolution, QPSolver, QPStatus
from implicit_layers.solvers.qp.interior_point import InteriorPoint
from implicit_layers.solvers.qp.osqp import OSQP

__all__ = ["QPSolver", "QPSolution", "QPStatus", "InteriorPoint", "OSQP"]
