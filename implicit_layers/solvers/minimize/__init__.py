"""Minimizers for argmin layers: they descend ``problem.objective`` to a stationary point."""

from implicit_layers.solvers.minimize.base import Minimizer
from implicit_layers.solvers.minimize.lbfgs import LBFGS
from implicit_layers.solvers.minimize.newton_cg import NewtonCG
from implicit_layers.solvers.minimize.scipy_minimize import ScipyMinimize

__all__ = ["Minimizer", "LBFGS", "NewtonCG", "ScipyMinimize"]
