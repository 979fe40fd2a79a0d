"""The autograd function of every implicit layer: ``y = y*(x)`` defined by ``f(x, y; θ) = 0``.

Derivation (``J = ∂f/∂y`` at the solution, ``z = (x, θ)``):

    pushforward:  J ẏ + (∂f/∂z) ż = 0          ⇒  ẏ = −J⁻¹ (∂f/∂z) ż
    pullback:     ⟨ȳ, ẏ⟩ = −⟨J⁻ᵀ ȳ, (∂f/∂z) ż⟩   ⇒  w = J⁻ᵀ ȳ,  z̄ = −(∂f/∂z)ᵀ w

The forward solve runs outside the autograd graph; the backward needs one transposed solve
with ``J`` and one VJP of the residual, the JVP one solve and one JVP of the residual. The
solves go through :class:`~implicit_layers.core.linear_solve.LinearSolve`, itself
differentiable, so double backward works; memory is independent of the solver's iterations.
Backward, JVP, double backward and the ``vmap`` rule live here once for every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.checks import all_finite, check_tensor
from implicit_layers.compat import any_wrapped, func_vjp, mutation_explained
from implicit_layers.core.jvp import jvp
from implicit_layers.core.linear_solve import LinearSolve
from implicit_layers.core.problem import ImplicitProblem, align_batch_dims
from implicit_layers.errors import ConvergenceError, attributed
from implicit_layers.solvers.base import RootProblem
from implicit_layers.stats import SolverStats, enforce


class ImplicitFunction(torch.autograd.Function):
    """``ImplicitFunction.apply(problem, y0, *xs, *params) → y`` with ``f(xs, y; params) = 0``.

    The autograd Function behind :class:`ImplicitLayer`; use a layer unless you need to build
    an :class:`~implicit_layers.core.problem.ImplicitProblem` by hand.

    >>> import torch, implicit_layers as il
    >>> from implicit_layers.core.problem import ImplicitProblem, align_batch_dims
    >>> prob = ImplicitProblem(fn=lambda xs, y, ps: y * y - xs[0], n_x=1, event_ndim=0,
    ...                        solver=il.Newton(), adjoint=il.DirectAdjoint())
    >>> x = torch.tensor([4.0], dtype=torch.float64, requires_grad=True)
    >>> y = il.ImplicitFunction.apply(prob, torch.ones(1, dtype=torch.float64), x)
    >>> y.detach(), torch.autograd.grad(y.sum(), x)[0]  # sqrt(x), 1 / (2 sqrt(x))
    (tensor([2.0000], dtype=torch.float64), tensor([0.2500], dtype=torch.float64))"""

    @staticmethod
    def forward(problem: ImplicitProblem, y0: Tensor, *tensors: Tensor) -> Tensor:
        xs, params = tensors[: problem.n_x], tensors[problem.n_x :]
        names = problem.x_names or (("x",) if problem.n_x == 1 else
                                    tuple(f"x[{i}]" for i in range(problem.n_x)))
        if problem.check_inputs:  # values: here, on plain tensors, once per call
            for name, x in zip(names, xs):
                check_tensor(name, x)
            check_tensor(problem.y0_name, y0)
        if y0.numel() == 0:  # nothing to solve: an empty batch or a zero-size unknown
            batch = y0.shape[: y0.ndim - problem.event_ndim]
            problem.stats.forward = SolverStats.exact("empty", batch, device=y0.device)
            return y0.clone()
        fixed_point_fn, objective_fn = problem.fixed_point_fn, problem.objective_fn
        root = RootProblem(
            residual=lambda y: problem.fn(xs, y, params),
            event_ndim=problem.event_ndim,
            fixed_point_map=(lambda y: fixed_point_fn(xs, y, params))
            if fixed_point_fn is not None else None,
            objective=(lambda y: objective_fn(xs, y, params))
            if objective_fn is not None else None,
            data=xs,
        )
        try:
            with mutation_explained(problem.name), attributed(problem.name, "forward solve"):
                result = problem.solver.solve(root, y0)
        except ConvergenceError:  # coupled samples would explain the failure: say so instead
            if problem.sample_check is not None:
                problem.sample_check(root.residual, y0)
            raise
        if problem.sample_check is not None:  # before any derivative is taken at y, and
            problem.sample_check(root.residual, result.y)  # before a failure is reported
        problem.stats.forward = enforce(result.stats, problem.on_failure,
                                        f"{problem.name}: forward solve f(x, y) = 0")
        problem.aux = result.aux  # e.g. a factorization at y*, which the adjoint reuses
        y = result.y
        if any(y is t for t in (y0, *tensors)):  # autograd needs a fresh output tensor
            y = y.clone()
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, _y0, *tensors = inputs
        ctx.problem = problem
        ctx.save_for_backward(*tensors, output)
        ctx.save_for_forward(*tensors, output)

    @staticmethod
    def _point(ctx) -> tuple[Tensor, ...]:
        """``z = (*xs, y*, *params)`` from the saved tensors."""
        *tensors, y = ctx.saved_tensors
        n_x = ctx.problem.n_x
        return (*tensors[:n_x], y, *tensors[n_x:])

    @staticmethod
    def backward(ctx, y_bar):
        problem = ctx.problem
        z = ImplicitFunction._point(ctx)
        needs = ctx.needs_input_grad[2:]
        if not any(needs):
            return (None,) * (len(z) + 1)
        if z[problem.n_x].numel() == 0:  # an empty solution depends on nothing
            return None, None, *(torch.zeros_like(t) if need else None
                                 for t, need in zip(z[:problem.n_x] + z[problem.n_x + 1:], needs))
        wrt = tuple(i for i in range(len(z)) if i != problem.n_x)  # every input but y
        wanted = tuple(i for i, need in zip(wrt, needs) if need)
        with mutation_explained(problem.name):
            w = LinearSolve.apply(problem, True, y_bar, *z)  # Jᵀ w = ȳ
            grads = _input_pullback(problem, z, w, wanted)  # z̄ = −(∂f/∂z)ᵀ w
        _check_finite_gradients(problem, y_bar, grads)
        return None, None, *(grads.get(i) for i in wrt)

    @staticmethod
    def jvp(ctx, _problem_dot, _y0_dot, *tangents):
        problem = ctx.problem
        z = ImplicitFunction._point(ctx)
        wrt = tuple(i for i in range(len(z)) if i != problem.n_x)
        moving = tuple((i, t) for i, t in zip(wrt, tangents) if t is not None)
        if not moving:
            return torch.zeros_like(z[problem.n_x])
        if z[problem.n_x].numel() == 0:
            return torch.zeros_like(z[problem.n_x])
        idx, dots = zip(*moving)
        with mutation_explained(problem.name):
            _, f_dot = jvp(lambda *zs: problem.residual_of_z(*_put(z, idx, zs)),
                           tuple(z[i] for i in idx), dots)
            return LinearSolve.apply(problem, False, -f_dot, *z)  # J ẏ = −(∂f/∂z) ż

    @staticmethod
    def vmap(info, in_dims, problem, y0, *tensors):
        y0_dim, dims = in_dims[1], in_dims[2:]
        B = info.batch_size
        y0 = y0.movedim(y0_dim, 0) if y0_dim is not None else y0.expand(B, *y0.shape)
        n_x = problem.n_x
        z_dims = tuple(0 if d is not None else None for d in dims)
        vproblem = problem.vmapped((*z_dims[:n_x], 0, *z_dims[n_x:]), info.randomness)
        if problem.broadcasts:
            tensors = align_batch_dims(tensors, dims, problem.x_event_ndims)
        else:
            tensors = tuple(t.movedim(d, 0) if d is not None else t for t, d in zip(tensors, dims))
        return ImplicitFunction.apply(vproblem, y0.contiguous(), *tensors), 0


def _input_pullback(problem: ImplicitProblem, z, w: Tensor, wanted) -> dict[int, Tensor]:
    """``{i: −(∂f/∂z_i)ᵀ w}`` for the inputs that need a gradient."""
    if problem.input_pullback is not None:
        return problem.input_pullback(z, w, wanted)
    _, vjp_fn = func_vjp(
        lambda *zs: problem.residual_of_z(*_put(z, wanted, zs)), *(z[i] for i in wanted))
    return {i: -g for i, g in zip(wanted, vjp_fn(w))}


def _check_finite_gradients(problem: ImplicitProblem, y_bar: Tensor, grads: dict) -> None:
    """A non-finite gradient from a finite cotangent is an error, not a result (one
    reduction per gradient; skipped under ``torch.func`` transforms, which forbid reading
    values, and when the layer opted out)."""
    if not problem.check_gradients or any_wrapped(y_bar, *grads.values()):
        return
    if not all(all_finite(g) for g in grads.values()) and all_finite(y_bar):
        raise ConvergenceError(
            f"{problem.name}: the backward produced NaN/Inf gradients from a finite cotangent "
            f"(the Jacobian ∂f/∂y is singular or the residual is not differentiable at the "
            f"solution)", problem.stats.backward)


def _put(z: tuple[Tensor, ...], idx: tuple[int, ...], values: tuple[Tensor, ...]):
    """``z`` with the entries at ``idx`` replaced by ``values``."""
    out = list(z)
    for i, v in zip(idx, values):
        out[i] = v
    return tuple(out)
