"""Forward nonlinear solvers (all outside the autograd graph)."""

from implicit_layers.solvers.base import RootProblem, RootSolver, SolveResult
from implicit_layers.solvers.broyden import Broyden
from implicit_layers.solvers.newton import Newton
from implicit_layers.solvers.picard import Picard
from implicit_layers.solvers.scipy_root import ScipyRoot

__all__ = ["RootProblem", "RootSolver", "SolveResult", "Broyden", "Newton", "Picard", "ScipyRoot"]
