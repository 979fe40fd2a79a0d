"""What the minimizers share: a batched objective with its gradient, on flattened iterates.

A minimizer receives a :class:`~implicit_layers.solvers.base.RootProblem` whose
``objective(y)`` returns one value per sample and whose ``residual(y)`` is the gradient
``∇_y objective``; it descends the objective and stops each sample when

    ‖∇f(y)‖ ≤ tol + rtol · ‖∇f(y₀)‖,

so a converged status is the statement the implicit gradient relies on: ``y`` is a
stationary point to that tolerance. The relative part scales with the first gradient, not
with ``‖y‖`` as for root solvers: a gradient is not in the units of ``y``, and an objective
that is unbounded below would otherwise "converge" once ``y`` is large enough. Values and
gradients come from one autograd pass of the objective (``∇`` of the sum over the batch is
the per-sample gradient, since samples are independent).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from implicit_layers.compat import func_vjp_with_aux, is_wrapped
from implicit_layers.errors import ConvergenceError
from implicit_layers.solvers.base import RootProblem, RootSolver
from implicit_layers.stats import SolverStats


def _functional(t: Tensor) -> bool:
    """Whether derivatives must come from ``torch.func``: under a ``torch.func`` transform, or
    in inference mode (where autograd records nothing); classic autograd is ~2× faster on the
    small calls of an iteration otherwise (measured here)."""
    return is_wrapped(t) or torch.is_inference_mode_enabled()


class Objective:
    """``objective`` and its gradient on iterates flattened to ``(B, n)``.

    Args:
        problem: the root problem; ``problem.objective`` must be set.
        y0: an iterate of the problem's shape ``(*batch, *event)``.
        solver: the solver's name, for error messages.

    Attributes:
        evaluations: how many batched evaluations were made.
    """

    def __init__(self, problem: RootProblem, y0: Tensor, solver: str):
        if problem.objective is None:
            raise ValueError(f"{solver} minimizes an objective: the problem has none (use "
                             "il.ArgminLayer, or pass objective= to the RootProblem)")
        self.problem, self.shape = problem, y0.shape
        self.objective: Callable[[Tensor], Tensor] = problem.objective
        self.batch_shape = problem.batch_shape(y0)
        self.B = self.batch_shape.numel()
        self.n = y0.shape[len(self.batch_shape):].numel()
        self.solver = solver
        self.evaluations = 0

    def flat(self, y: Tensor) -> Tensor:
        return y.reshape(self.B, self.n)

    def unflat(self, y: Tensor) -> Tensor:
        return y.reshape(self.shape)

    def _values(self, y: Tensor) -> Tensor:
        f = self.objective(self.unflat(y))
        if f.shape != self.batch_shape:
            raise ValueError(f"objective must return one value per sample, shape "
                             f"{tuple(self.batch_shape)}; got {tuple(f.shape)}")
        return f.reshape(self.B)

    def _total(self, y: Tensor) -> tuple[Tensor, Tensor]:
        f = self._values(y)
        return f.sum(), f

    def value(self, y: Tensor) -> Tensor:
        """Per-sample values ``(B,)`` at ``y`` of shape ``(B, n)``."""
        self.evaluations += 1
        return self._values(y)

    def value_and_grad(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(f (B,), ∇f (B, n))`` at ``y`` of shape ``(B, n)``, in one autograd pass."""
        self.evaluations += 1
        if _functional(y):
            g, f = torch.func.grad(self._total, has_aux=True)(y)
            return f, g
        with torch.enable_grad():
            v = y.detach().requires_grad_()
            f = self._values(v)
            (g,) = torch.autograd.grad(f.sum(), v)
        return f.detach(), g

    def linearize(self, y: Tensor):
        """``(f, ∇f, hvp)`` at ``y``: ``hvp(v) = ∇²f v`` (per sample, ``v`` of shape (B, n)),
        as a reverse-over-reverse product that reuses one recorded gradient graph."""
        self.evaluations += 1
        if _functional(y):
            grad = torch.func.grad(self._total, has_aux=True)
            g, vjp, f = func_vjp_with_aux(grad, y)
            return f, g, lambda v: vjp(v)[0]  # ∇²f is symmetric: the VJP is the HVP
        with torch.enable_grad():
            v0 = y.detach().requires_grad_()
            f = self._values(v0)
            (g,) = torch.autograd.grad(f.sum(), v0, create_graph=True)

        def hvp(v: Tensor) -> Tensor:
            with torch.enable_grad():
                (Hv,) = torch.autograd.grad(g, v0, v, retain_graph=True)
            return Hv

        return f.detach(), g.detach(), hvp


class GradientLog:
    """The iteration log of a minimizer: a sample converges when
    ``‖∇f‖ ≤ tol + rtol · ‖∇f(y₀)‖`` (the relative scale is the first gradient, not the iterate
    as for root solvers, so an objective unbounded below never "converges" far away).

    Norms are overflow-safe (:func:`~implicit_layers.solvers.base.safe_norm`); a non-finite
    gradient norm is never converged and raises ``ConvergenceError``. Attributes: ``res``
    (gradient norms), ``done``, ``iterations``, ``evaluations``, ``scale`` (``∇f(y₀)``).
    """

    def __init__(self, solver: RootSolver, problem: RootProblem, g0: Tensor):
        self.solver, self.problem, self.dtype = solver, problem, g0.dtype
        self.tol, self.rtol = solver.tolerances(g0.dtype)
        self.scale = g0
        self.evaluations = 1
        self.res = problem.norm(g0)
        self.iterations = torch.zeros_like(self.res, dtype=torch.int64)
        self.trace: list[Tensor] = []
        self.done = torch.zeros_like(self.res, dtype=torch.bool)
        self._record(0)

    @property
    def active(self) -> Tensor:
        return ~self.done

    def converged(self, res: Tensor) -> Tensor:
        """``res ≤ tol + rtol · ‖∇f(y₀)‖`` and finite."""
        bound = self.tol + self.rtol * self.problem.norm(self.scale)
        return torch.isfinite(res) & (res <= bound)

    def update(self, g: Tensor, active: Tensor, evaluations: int = 1) -> None:
        """Record one iteration of the samples in ``active`` (batch-shaped mask)."""
        self.evaluations += evaluations
        self.res = torch.where(active, self.problem.norm(g), self.res)
        self.iterations = self.iterations + active.to(torch.int64)
        self._record(len(self.trace))

    def _record(self, iteration: int) -> None:
        if not bool(torch.isfinite(self.res).all()):
            raise ConvergenceError(f"{self.solver.name}: non-finite gradient at iteration "
                                   f"{iteration}; the solve was stopped instead of "
                                   f"propagating NaN/Inf")
        self.done = self.done | self.converged(self.res)
        self.trace.append(self.res)

    def stats(self, **extra) -> SolverStats:
        return SolverStats(solver=self.solver.name, iterations=self.iterations,
                           residual=self.res, converged=self.done, trace=torch.stack(self.trace),
                           evaluations=self.evaluations, extra=extra)


class Minimizer(RootSolver):
    """Base of the minimizers: a :class:`RootSolver` that needs ``problem.objective``.

    ``solve`` never raises for non-convergence (the caller applies the failure policy); a
    sample whose line search finds no decrease from a steepest-descent direction stops and is
    reported as not converged (``stats.extra["stalled"]``). Convergence: see
    :class:`GradientLog`.

    >>> import torch, implicit_layers as il
    >>> prob = il.RootProblem(lambda y: 2 * (y - 3), objective=lambda y: ((y - 3) ** 2).sum(-1))
    >>> il.LBFGS().solve(prob, torch.zeros(1, 2, dtype=torch.float64)).y.round(decimals=9)
    tensor([[3., 3.]], dtype=torch.float64)
    """
