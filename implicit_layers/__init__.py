"""implicit_layers: differentiable implicit layers for PyTorch.

A layer's output ``y`` is defined by ``f(x, y) = 0``. The forward pass solves it with any
solver outside the autograd graph; the backward pass solves ``(∂_y f)ᵀ w = ȳ`` and returns
``x̄ = −(∂_x f)ᵀ w``; forward mode solves ``(∂_y f) ẏ = −(∂_x f) ẋ``.
"""

from implicit_layers import functional

# --- core (issue 2) ---
from implicit_layers.core.adjoint import Adjoint, DirectAdjoint, FixedPointAdjoint, KrylovAdjoint
from implicit_layers.core.implicit import ImplicitFunction, ImplicitLayer
from implicit_layers.core.stats import LayerStats, SolverStats
from implicit_layers.errors import (
    ConvergenceError,
    ConvergenceWarning,
    ImplicitLayerError,
    SingularSystemError,
)
from implicit_layers.layers.root_find import RootFindLayer
from implicit_layers.linalg import CG, GMRES, LU, BiCGStab, Cholesky
from implicit_layers.solvers import Broyden, Newton, Picard, RootProblem, RootSolver, ScipyRoot, SolveResult

# --- layers: equality QP (issue 3) ---
from implicit_layers.layers.eq_qp import EqualityQPLayer
from implicit_layers.layers.eq_qp_dense import DenseKKTBackend
from implicit_layers.layers.eq_qp_osqp import OSQPBackend
from implicit_layers.layers.eq_qp_sparse import SparseKKTBackend
# --- layers: Lyapunov (issue 4) ---
from implicit_layers.layers.lyapunov import DiscreteLyapunovLayer, LyapunovLayer
from implicit_layers.layers.sylvester import SylvesterLayer
# --- layers: DEQ (issue 5) ---
from implicit_layers.layers.deq import DEQLayer
from implicit_layers.layers.deq_adjoint import JacobianFreeAdjoint, PhantomAdjoint
from implicit_layers.solvers.anderson import Anderson
# --- layers: QP (issue 7) ---
# isort: off
from implicit_layers.layers.qp import QPLayer
from implicit_layers.layers.qp_osqp import OSQP
from implicit_layers.solvers.interior_point import InteriorPoint, QPStatus
# isort: on

__all__ = [name for name in dir() if not name.startswith("_")]
