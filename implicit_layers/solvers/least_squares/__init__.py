"""Solvers for nonlinear least squares ``min_y ½‖r(x, y)‖²`` (least-squares layers)."""

from implicit_layers.solvers.least_squares.base import (
    LeastSquaresSolver,
    NormalEquations,
    SumOfSquares,
    residual_vectors,
)
from implicit_layers.solvers.least_squares.gauss_newton import GaussNewton
from implicit_layers.solvers.least_squares.levenberg_marquardt import LevenbergMarquardt

__all__ = ["LeastSquaresSolver", "NormalEquations", "SumOfSquares", "residual_vectors",
           "GaussNewton", "LevenbergMarquardt"]
