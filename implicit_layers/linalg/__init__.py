"""Linear solvers: dense factorizations and matrix-free Krylov methods."""

from implicit_layers.linalg.base import Factorization, LinearOperator, LinearSolver
from implicit_layers.linalg.dense import LU, Cholesky, lu_factor
from implicit_layers.linalg.krylov import CG, GMRES, BiCGStab, KrylovSolver

__all__ = [
    "LinearOperator", "LinearSolver", "Factorization",
    "LU", "Cholesky", "lu_factor", "CG", "GMRES", "BiCGStab", "KrylovSolver",
]
