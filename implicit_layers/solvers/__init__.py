"""Forward solvers (all run outside the autograd graph)."""

from implicit_layers.solvers.anderson import Anderson
from implicit_layers.solvers.base import RootProblem, RootSolver, SolveResult
from implicit_layers.solvers.broyden import Broyden
from implicit_layers.solvers.least_squares import GaussNewton, LevenbergMarquardt
from implicit_layers.solvers.minimize import LBFGS, NewtonCG, ScipyMinimize
from implicit_layers.solvers.newton import Newton
from implicit_layers.solvers.picard import Picard
from implicit_layers.solvers.qp import OSQP, InteriorPoint, QPSolver, QPStatus
from implicit_layers.solvers.scipy_root import ScipyRoot

__all__ = ["RootProblem", "RootSolver", "SolveResult", "Anderson", "Broyden", "Newton", "Picard",
           "ScipyRoot", "QPSolver", "InteriorPoint", "OSQP", "QPStatus", "LBFGS", "NewtonCG",
           "ScipyMinimize", "GaussNewton", "LevenbergMarquardt"]
