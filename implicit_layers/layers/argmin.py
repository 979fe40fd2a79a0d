"""Argmin as a layer: ``y*(x) = argmin_y f(x, y)``, differentiated through ``∇_y f(x, y*) = 0``.

The layer is the generic :class:`~implicit_layers.ImplicitLayer` whose residual is the
gradient ``F(x, y) = ∇_y f(x, y)`` and whose ``∂F/∂y`` is the Hessian ``H = ∇²_y f``. With
``z = (x, θ)`` and ``F(z, y*(z)) = 0``:

    pushforward:  H ẏ + (∂F/∂z) ż = 0              ⇒  ẏ = −H⁻¹ ∇²_{yz} f ż
    pullback:     ⟨ȳ, ẏ⟩ = −⟨H⁻¹ ȳ, ∇²_{yz} f ż⟩     ⇒  w = H⁻¹ ȳ  (H = Hᵀ),  z̄ = −∇²_{zy} f w

so a backward pass is one solve with the symmetric Hessian and one mixed second derivative
(a VJP of the gradient). :class:`HessianAdjoint` solves it by CG on Hessian-vector products
(matrix-free; CG's ``pᵀHp ≤ 0`` proves the point is not a minimizer, which is reported) or,
for small ``y``, by a Cholesky factorization of the materialized Hessian, shared by the
backward, the JVP and double backward. The gradient is taken with ``torch.func.grad``, so
forward mode, ``vmap`` and higher derivatives compose as for every layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from implicit_layers.checks import check_count, check_positive
from implicit_layers.core.adjoint import Adjoint, DirectAdjoint
from implicit_layers.core.layer import ImplicitLayer, Inputs
from implicit_layers.errors import SingularSystemError
from implicit_layers.linalg.dense import Cholesky
from implicit_layers.solvers.base import RootSolver
from implicit_layers.solvers.minimize.cg import conjugate_gradient
from implicit_layers.solvers.minimize.lbfgs import LBFGS
from implicit_layers.stats import SolverStats

NOT_A_MINIMUM = ("y is a saddle point or a maximum of the objective, not a minimizer, and an "
                 "argmin has no derivative there (start the solve elsewhere, or differentiate the "
                 "stationarity condition with il.ImplicitLayer and a general adjoint)")


def objective_gradient(objective: Callable, x, y: Tensor) -> Tensor:
    """``∇_y objective(x, y)``, per sample: samples are independent, so the gradient of the
    sum over the batch is the gradient of each sample's value. Bound with
    ``functools.partial`` (not a module: the objective's parameters are registered once)."""
    return torch.func.grad(lambda v: objective(x, v).sum())(y)


class HessianAdjoint(Adjoint):
    """Solves ``∇²_y f · w = b`` at the minimizer (the Hessian is symmetric: a transposed
    solve is the same solve).

    Args:
        method: ``"cg"`` (conjugate gradients on Hessian-vector products, matrix-free),
            ``"cholesky"`` (the Hessian materialized by ``n`` batched products and factored
            once per solution, reused by the backward, the JVP and double backward), or
            ``"auto"`` (default): Cholesky when ``n ≤ direct_max_n``, CG otherwise.
        rtol: CG's relative tolerance ``‖b − Hw‖ ≤ rtol · ‖b‖`` (default ``eps**0.75``).
        max_iter: CG iterations per solve (default ``10 n + 10``).
        direct_max_n: the largest ``n`` that ``"auto"`` factors.

    Raises:
        SingularSystemError: the Hessian is not positive definite at the solution (a saddle
            point or a maximum: CG met ``pᵀHp ≤ 0`` or Cholesky failed), or it is singular.

    >>> import torch, implicit_layers as il
    >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    >>> f = lambda b, y: 0.5 * y @ A @ y - b @ y                     # y* = A⁻¹ b
    >>> y = il.ArgminLayer(f, adjoint=il.HessianAdjoint("cg"))(b, torch.zeros(2).double())
    >>> torch.allclose(torch.autograd.grad(y.sum(), b)[0], torch.linalg.inv(A).sum(0))
    True
    """

    METHODS = ("auto", "cg", "cholesky")

    def __init__(self, method: str = "auto", rtol: float | None = None,
                 max_iter: int | None = None, direct_max_n: int = 64):
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        self.method, self.rtol = method, check_positive("rtol", rtol)
        self.max_iter = None if max_iter is None else check_count("max_iter", max_iter)
        self.direct_max_n = check_count("direct_max_n", direct_max_n, minimum=0)
        self._direct = DirectAdjoint(Cholesky())

    def uses_cholesky(self, n: int) -> bool:
        return self.method == "cholesky" or (self.method == "auto" and n <= self.direct_max_n)

    def solve(self, lin, rhs: Tensor, transpose: bool) -> tuple[Tensor, SolverStats]:
        if self.uses_cholesky(lin.n):
            try:
                return self._direct.solve(lin, rhs, transpose)
            except SingularSystemError as err:
                raise SingularSystemError(f"Hessian ∇²_y f at the solution: {err}; if it is "
                                          f"not positive definite, {NOT_A_MINIMUM}") from err
        return self.cg_solve(lin, rhs)

    def cg_solve(self, lin, rhs: Tensor, preconditioner=None, name: str = "HessianCG"):
        """CG on the products of ``lin.operator()`` (reverse-over-reverse: the recorded
        gradient is linearized once and reused by every product); ``preconditioner`` maps
        ``b``-shaped residuals to ``M⁻¹ r``."""
        op, b = lin.operator(), lin.flatten(rhs)
        flat = b.reshape(-1, lin.n)

        def hvp(v: Tensor) -> Tensor:
            return op.matvec(v.reshape(b.shape), transpose=True).reshape(flat.shape)

        def precondition(r: Tensor) -> Tensor:
            return preconditioner(r.reshape(b.shape)).reshape(flat.shape)

        rtol = self.rtol if self.rtol is not None else torch.finfo(b.dtype).eps ** 0.75
        max_iter = self.max_iter if self.max_iter is not None else 10 * lin.n + 10
        res = conjugate_gradient(hvp, flat, rtol * flat.norm(dim=-1), max_iter,
                                 precondition if preconditioner is not None else None,
                                 true_residual=True)
        if bool(res.negative_curvature.any()):
            bad = int(res.negative_curvature.sum())
            raise SingularSystemError(
                f"the Hessian ∇²_y f at the solution has negative curvature (CG met pᵀHp ≤ 0) in "
                f"{bad} of {res.negative_curvature.numel()} solves: {NOT_A_MINIMUM}")
        shape = b.shape[:-1]
        stats = SolverStats(name, res.iterations.reshape(shape), res.residual.reshape(shape),
                            res.converged.reshape(shape), evaluations=res.products)
        return res.x.reshape(rhs.shape), stats

    def __repr__(self) -> str:
        return f"HessianAdjoint({self.method!r})"


class ArgminLayer(ImplicitLayer):
    """``y* = argmin_y objective(x, y)``, differentiable in ``x`` and in the objective's
    parameters.

    Args:
        objective: ``(x, y) ↦ f``, one value per sample (shape = the batch dims of ``y``; a
            scalar for an unbatched ``y``); ``x`` is a Tensor or a tuple of Tensors. An
            ``nn.Module``'s parameters receive gradients. Samples must not interact.
        solver: a minimizer: :class:`~implicit_layers.LBFGS` (default),
            :class:`~implicit_layers.NewtonCG`, :class:`~implicit_layers.ScipyMinimize`.
        adjoint: how the Hessian systems are solved (default :class:`HessianAdjoint`).
        event_ndim, on_failure, init: see :class:`~implicit_layers.ImplicitLayer`.

    The forward solve stops each sample at ``‖∇_y f‖ ≤ tol + rtol ‖∇_y f(y₀)‖``; the gradient is exact
    at a minimizer with a positive definite Hessian, and a saddle point or maximum raises
    :class:`~implicit_layers.SingularSystemError` in the backward.

    >>> import torch, implicit_layers as il
    >>> X, t = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    >>> ridge = lambda lam, w: 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
    >>> w = il.ArgminLayer(ridge)(lam, torch.zeros(3, dtype=torch.float64))
    >>> H = X.T @ X + lam.detach() * torch.eye(3, dtype=torch.float64)
    >>> torch.allclose(w, torch.linalg.solve(H, X.T @ t))
    True
    >>> (dw,) = torch.autograd.grad(w.sum(), lam)                  # dw/dλ = −H⁻¹ w
    >>> torch.allclose(dw, -torch.linalg.solve(H, w.detach()).sum())
    True
    """

    def __init__(self, objective: Callable, solver: RootSolver | None = None,
                 adjoint: Adjoint | None = None, *, event_ndim: int = 1,
                 on_failure: str = "raise", init: Callable | None = None):
        if not callable(objective):
            raise ValueError("objective must be callable (x, y) -> one value per sample")
        super().__init__(functools.partial(objective_gradient, objective),
                         solver if solver is not None else LBFGS(),
                         adjoint if adjoint is not None else HessianAdjoint(),
                         event_ndim=event_ndim, on_failure=on_failure, init=init,
                         objective=objective)

    def forward(self, x: Inputs, y0: Tensor | None = None) -> Tensor:
        """``argmin_y objective(x, y)``, descended from ``y0`` (default ``init(x)``)."""
        return self._forward(x, y0)
