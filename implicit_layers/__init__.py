"""implicit_layers: differentiable implicit layers for PyTorch.

A layer's output ``y`` is defined by ``f(x, y) = 0``. The forward pass solves it with any
solver outside the autograd graph; the backward pass solves ``(∂_y f)ᵀ w = ȳ`` and returns
``x̄ = −(∂_x f)ᵀ w``; forward mode solves ``(∂_y f) ẏ = −(∂_x f) ẋ``.
"""

from implicit_layers import functional
from implicit_layers._version import __version__
from implicit_layers.core.adjoint import (
    Adjoint,
    DirectAdjoint,
    FactorizationAdjoint,
    FixedPointAdjoint,
    KrylovAdjoint,
)
from implicit_layers.core.implicit import ImplicitFunction
from implicit_layers.core.layer import ImplicitLayer
from implicit_layers.errors import (
    ConvergenceError,
    ConvergenceWarning,
    ImplicitLayerError,
    SingularSystemError,
)
from implicit_layers.layers.argmin import ArgminLayer, HessianAdjoint
from implicit_layers.layers.deq import DEQLayer, JacobianFreeAdjoint, PhantomAdjoint
from implicit_layers.layers.eq_qp import (
    DenseKKTBackend,
    EqualityQPLayer,
    OSQPBackend,
    SparseKKTBackend,
)
from implicit_layers.layers.least_squares import LeastSquaresAdjoint, LeastSquaresLayer
from implicit_layers.layers.lp_gradients import PerturbedLP, SmoothedLP
from implicit_layers.layers.lyapunov import DiscreteLyapunovLayer, LyapunovLayer
from implicit_layers.layers.qp import QPLayer
from implicit_layers.layers.root_find import RootFindLayer
from implicit_layers.layers.sylvester import SylvesterLayer
from implicit_layers.linalg import CG, GMRES, LU, BiCGStab, Cholesky
from implicit_layers.solvers import (
    LBFGS,
    OSQP,
    Anderson,
    Broyden,
    GaussNewton,
    InteriorPoint,
    LevenbergMarquardt,
    Newton,
    NewtonCG,
    Picard,
    QPSolver,
    QPStatus,
    RootProblem,
    RootSolver,
    ScipyMinimize,
    ScipyRoot,
    SolveResult,
)
from implicit_layers.stats import LayerStats, SolverStats

__all__ = [
    # layers
    "ImplicitLayer", "RootFindLayer", "EqualityQPLayer", "QPLayer", "LyapunovLayer",
    "DiscreteLyapunovLayer", "SylvesterLayer", "DEQLayer", "ArgminLayer", "LeastSquaresLayer",
    "ImplicitFunction",
    # informative gradients for linear programs
    "SmoothedLP", "PerturbedLP",
    # forward solvers
    "RootSolver", "RootProblem", "SolveResult", "Newton", "Broyden", "Picard", "Anderson",
    "ScipyRoot", "QPSolver", "InteriorPoint", "QPStatus", "OSQP",
    # minimizers and least-squares solvers (argmin layers)
    "LBFGS", "NewtonCG", "ScipyMinimize", "GaussNewton", "LevenbergMarquardt",
    # adjoints (how backward / JVP systems are solved)
    "Adjoint", "DirectAdjoint", "KrylovAdjoint", "FixedPointAdjoint", "FactorizationAdjoint",
    "PhantomAdjoint", "JacobianFreeAdjoint", "HessianAdjoint", "LeastSquaresAdjoint",
    # QP backends
    "DenseKKTBackend", "SparseKKTBackend", "OSQPBackend",
    # linear algebra
    "LU", "Cholesky", "CG", "GMRES", "BiCGStab",
    # stats and errors
    "SolverStats", "LayerStats", "ImplicitLayerError", "ConvergenceError", "SingularSystemError",
    "ConvergenceWarning",
    "functional",
]
