"""How the linear systems of the backward and forward-mode passes are solved.

At a solution ``y*`` of ``f(x, y) = 0`` with ``J = ∂f/∂y``:

* reverse mode solves ``Jᵀ w = ȳ`` (``transpose=True``), then ``x̄ = −(∂f/∂x)ᵀ w``;
* forward mode solves ``J ẏ = −(∂f/∂x) ẋ`` (``transpose=False``).

An :class:`Adjoint` only solves these systems numerically; making the solve differentiable
(double backward) is the job of :class:`~implicit_layers.core.linear_solve.LinearSolve`, so
every adjoint here supports ``gradgradcheck``. A layer that already holds a factorization of
``J`` from its forward solve supplies its own adjoint that reads it from ``lin.aux``.

>>> import implicit_layers as il
>>> adj = il.KrylovAdjoint(il.GMRES(rtol=1e-10))   # matrix-free, for large y
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from implicit_layers.core.linearization import Linearization
from implicit_layers.linalg.base import LinearSolver
from implicit_layers.linalg.dense import LU
from implicit_layers.linalg.krylov import GMRES, KrylovSolver
from implicit_layers.solvers.base import RootProblem, RootSolver
from implicit_layers.solvers.picard import Picard
from implicit_layers.stats import SolverStats


def _instance(name: str, value, kind: type, default: type):
    """``value``, or a ``default()`` when None; ``ValueError`` unless it is a ``kind``."""
    if value is None:
        return default()
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a {kind.__name__} instance, got {value!r}")
    return value


class Adjoint(ABC):
    """Solves ``J v = b`` or ``Jᵀ v = b`` at the solution of the forward problem.

    Subclass it to supply a problem-specific solve; ``lin.aux`` holds whatever the forward
    solver returned for reuse (see the README).

    >>> import torch, implicit_layers as il
    >>> class Identity(il.Adjoint):          # valid when ∂f/∂y = I, e.g. f = y − x
    ...     def solve(self, lin, rhs, transpose):
    ...         return rhs, il.SolverStats.exact("identity", lin.batch_shape)
    >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> y = il.functional.root_find(lambda x, y: y - x, x, torch.zeros(2, dtype=torch.float64),
    ...                             adjoint=Identity())
    >>> torch.autograd.grad(y.sum(), x)[0]
    tensor([1., 1.], dtype=torch.float64)"""

    @abstractmethod
    def solve(self, lin: Linearization, rhs: Tensor, transpose: bool) -> tuple[Tensor, SolverStats]:
        """Return the solution (shaped like ``rhs``) and the solve's stats."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DirectAdjoint(Adjoint):
    """Materialize the per-sample Jacobian blocks with ``n`` batched VJPs and factor them.

    The factorization is cached for the point it belongs to, so the backward, the JVP and the
    double backward at the same solution share one factorization (transposes are free).
    Best for small ``n`` (up to a few hundred unknowns per sample).

    Args:
        solver: a dense :class:`~implicit_layers.linalg.LinearSolver` (default :class:`LU`).

    >>> import torch, implicit_layers as il
    >>> A = torch.tensor([[3., 1.], [1., 2.]], dtype=torch.float64)
    >>> x = torch.tensor([1., 1.], dtype=torch.float64, requires_grad=True)
    >>> y = il.functional.root_find(lambda x, y: A @ y - x, x, torch.zeros(2, dtype=torch.float64),
    ...                              adjoint=il.DirectAdjoint())
    >>> torch.allclose(y, torch.linalg.solve(A, x))
    True
    """

    def __init__(self, solver: LinearSolver | None = None):
        self.solver = _instance("solver", solver, LinearSolver, LU)
        if not self.solver.needs_dense:
            raise ValueError("DirectAdjoint needs a dense solver (LU, Cholesky); "
                             "use KrylovAdjoint for matrix-free solvers")

    def solve(self, lin, rhs, transpose):
        fac = lin.cached(
            f"direct:{id(self)}",
            lambda: self.solver.factor(lin.operator(), what="the Jacobian ∂f/∂y at the solution"),
        )
        sol = fac.solve(lin.flatten(rhs), transpose=transpose).reshape(rhs.shape)
        return sol, SolverStats.exact(type(self.solver).__name__, lin.batch_shape, device=rhs.device)

    def __repr__(self):
        return f"DirectAdjoint({type(self.solver).__name__})"


class KrylovAdjoint(Adjoint):
    """Matrix-free solves with a Krylov method (products are JVPs/VJPs of the residual).

    >>> import torch, implicit_layers as il
    >>> x = torch.tensor([0.5, -0.5], dtype=torch.float64, requires_grad=True)
    >>> y = il.functional.root_find(lambda x, y: torch.tanh(y) + y - x, x,
    ...                             torch.zeros(2, dtype=torch.float64),
    ...                             adjoint=il.KrylovAdjoint(il.GMRES(rtol=1e-12)))
    >>> g = torch.autograd.grad(y.sum(), x)[0]           # 1 / (1 + sech²(y))
    >>> torch.allclose(g, 1 / (2 - torch.tanh(y.detach()) ** 2))
    True

    Args:
        solver: :class:`~implicit_layers.linalg.GMRES` (default), ``BiCGStab``, or ``CG``
            (only when ``J`` is symmetric positive definite).
    """

    def __init__(self, solver: KrylovSolver | None = None):
        self.solver = _instance("solver", solver, KrylovSolver, GMRES)

    def solve(self, lin, rhs, transpose):
        fac = self.solver.factor(lin.operator())
        sol = fac.solve(lin.flatten(rhs), transpose=transpose).reshape(rhs.shape)
        return sol, fac.stats

    def __repr__(self):
        return f"KrylovAdjoint({type(self.solver).__name__})"


class FixedPointAdjoint(Adjoint):
    """Iterate ``v ← v + (Jᵀ v − b)`` (or with ``J``) with a fixed-point solver.

    For a fixed-point residual ``f = g(y) − y`` this is ``v ← J_gᵀ v − b``, which converges when
    the forward map is contractive (spectral radius of ``J_g`` below one), the usual setting
    of deep equilibrium models. Any forward solver that iterates ``g`` works
    (:class:`~implicit_layers.Picard`, :class:`~implicit_layers.Anderson`).

    >>> import torch, implicit_layers as il
    >>> x = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    >>> z = il.functional.root_find(lambda x, z: 0.5 * torch.cos(z) + x - z, x,
    ...                             torch.zeros(1, dtype=torch.float64),
    ...                             adjoint=il.FixedPointAdjoint(il.Picard(tol=1e-14)))
    >>> g = torch.autograd.grad(z.sum(), x)[0]           # 1 / (1 + 0.5 sin z)
    >>> torch.allclose(g, 1 / (1 + 0.5 * torch.sin(z.detach())))
    True
    """

    def __init__(self, solver: RootSolver | None = None):
        self.solver = _instance("solver", solver, RootSolver, Picard)

    def solve(self, lin, rhs, transpose):
        op = lin.operator()
        b = lin.flatten(rhs)
        system = RootProblem(lambda v: op.matvec(v, transpose) - b, event_ndim=1)
        result = self.solver.solve(system, torch.zeros_like(b))
        return result.y.reshape(rhs.shape), result.stats

    def __repr__(self):
        return f"FixedPointAdjoint({self.solver!r})"


class FactorizationAdjoint(Adjoint):
    """Reuse the factorization the forward solver left at the solution (``lin.aux``).

    Structured layers (QPs, Lyapunov equations) factor ``J = ∂f/∂y`` as part of their forward
    solve; their solvers return it in :attr:`SolveResult.aux <implicit_layers.SolveResult>` as a
    :class:`~implicit_layers.linalg.Factorization` (``solve(b, transpose)`` on flattened
    vectors ``(*extra, *batch, n)``). This adjoint solves the backward and tangent systems with
    it, adding ``refine`` steps of iterative refinement against the exact ``J`` (its products
    are JVPs/VJPs of the residual) when the factorization is of a nearby matrix (a regularized
    or interior-point one). Where there is no ``aux`` (a problem derived under ``vmap``) it
    calls ``factor(lin)``, once per point, or falls back to ``DirectAdjoint()``.

    Args:
        factor: ``Linearization ↦ Factorization`` at ``lin.z``, without the forward solver.
        refine: refinement steps per solve.

    >>> import torch, implicit_layers as il
    >>> from implicit_layers.linalg import LU
    >>> class Solver(il.Newton):                  # leaves its factorization of J = A for reuse
    ...     def solve(self, problem, y0):
    ...         res = super().solve(problem, y0)
    ...         res.aux = LU().factor(problem.jacobian(res.y))
    ...         return res
    >>> A = torch.tensor([[3., 1.], [1., 2.]], dtype=torch.float64)
    >>> x = torch.tensor([1., 1.], dtype=torch.float64, requires_grad=True)
    >>> y = il.ImplicitLayer(lambda x, y: y @ A.T - x, Solver(),
    ...                      il.FactorizationAdjoint())(x, torch.zeros(2, dtype=torch.float64))
    >>> torch.allclose(torch.autograd.grad(y.sum(), x)[0], torch.linalg.solve(A.T, torch.ones(2,
    ...                dtype=torch.float64)))
    True
    """

    def __init__(self, factor=None, refine: int = 0):
        if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
            raise ValueError(f"refine must be an integer >= 0, got {refine!r}")
        self.factor, self.refine = factor, refine

    def solve(self, lin, rhs, transpose):
        fac = lin.aux
        if fac is None and self.factor is not None:
            fac = lin.cached(f"factorization:{id(self)}", lambda: self.factor(lin))
        if fac is None:
            return DirectAdjoint().solve(lin, rhs, transpose)
        b = lin.flatten(rhs)
        sol = fac.solve(b, transpose=transpose)
        if self.refine:
            op = lin.operator()
            for _ in range(self.refine):  # v ← v + K⁻¹(b − K v) with the exact K
                sol = sol + fac.solve(b - op.matvec(sol, transpose), transpose=transpose)
        stats = getattr(fac, "stats", None) or SolverStats.exact(
            type(fac).__name__, lin.batch_shape, device=rhs.device)
        return sol.reshape(rhs.shape), stats

    def __repr__(self):
        return f"FactorizationAdjoint(refine={self.refine})"
