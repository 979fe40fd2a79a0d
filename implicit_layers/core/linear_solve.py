"""A differentiable solve with the Jacobian of a residual: ``v = K(z)⁻¹ b``, ``K = J`` or ``Jᵀ``.

``J = ∂f/∂y`` at ``z = (*xs, y, *params)``. The numerical solve is delegated to the problem's
:class:`~implicit_layers.core.adjoint.Adjoint`; this Function makes it differentiable in ``b``
and in ``z``, which is what double backward through an implicit layer needs.

Derivation (``v = K⁻¹ b``, so ``K v = b``):

    pushforward:  K v̇ + K̇ v = ḃ      ⇒   v̇ = K⁻¹ (ḃ − K̇ v)
    pullback:     ⟨v̄, v̇⟩ = ⟨K⁻ᵀ v̄, ḃ⟩ − ⟨K⁻ᵀ v̄, K̇ v⟩
                  ⇒ b̄ = q := K⁻ᵀ v̄     (one more solve, with the transposed flag flipped)
                  ⇒ z̄ = −∇_z ⟨q, K(z) v⟩ with q and v held fixed.

Both ``⟨q, J v⟩`` and ``⟨q, Jᵀ v⟩`` are written as ``⟨vjp_y f(z)[a], c⟩`` (with ``(a, c) = (q, v)``
for ``K = J`` and ``(v, q)`` for ``K = Jᵀ``), differentiated in ``z`` (reverse over reverse).
Because the inner solve is again a LinearSolve, derivatives of any order are available.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.compat import func_vjp
from implicit_layers.core.jvp import jvp
from implicit_layers.core.linearization import Linearization
from implicit_layers.core.problem import ImplicitProblem, align_batch_dims
from implicit_layers.errors import attributed
from implicit_layers.stats import enforce


def _over_extra(fn, v: Tensor, y: Tensor) -> Tensor:
    """Apply ``fn`` (defined on ``y``-shaped tensors) to ``v``, mapping over extra leading dims."""
    if v.ndim == y.ndim:
        return fn(v)
    flat = v.reshape(-1, *y.shape)
    return torch.func.vmap(fn)(flat).reshape(v.shape)


def _bilinear(problem: ImplicitProblem, a: Tensor, c: Tensor):
    """``z ↦ ⟨(∂f/∂y)(z)ᵀ a, c⟩`` (summed over any extra leading dims of ``a`` and ``c``)."""

    def s(*z: Tensor) -> Tensor:
        y = problem.split(z)[1]
        _, vjp_y = func_vjp(problem.residual_of_y(z), y)
        return (_over_extra(lambda w: vjp_y(w)[0], a, y) * c).sum()

    return s


def _products(problem: ImplicitProblem, transpose: bool, v: Tensor):
    """``z ↦ K(z) v`` (a JVP or a VJP of the residual in ``y``)."""

    def kv(*z: Tensor) -> Tensor:
        f_y, y = problem.residual_of_y(z), problem.split(z)[1]
        if transpose:
            vjp_y = func_vjp(f_y, y)[1]
            return _over_extra(lambda w: vjp_y(w)[0], v, y)
        return _over_extra(lambda u: jvp(f_y, (y,), (u,))[1], v, y)

    return kv


class LinearSolve(torch.autograd.Function):
    """``LinearSolve.apply(problem, transpose, b, *z) = K(z)⁻¹ b`` (see the module docstring).

    The one differentiable factored solve of the package: the numerical solve is the
    problem's adjoint (which reuses the forward solver's factorization where it has one), the
    operator's products ``K(z) v`` are JVPs/VJPs of the residual."""

    @staticmethod
    def forward(problem: ImplicitProblem, transpose: bool, rhs: Tensor, *z: Tensor) -> Tensor:
        lin = Linearization(problem, z)
        phase, what = ("backward", "adjoint solve (∂f/∂y)ᵀ w = ȳ") if transpose else (
            "tangent", "tangent solve (∂f/∂y) ẏ = −(∂f/∂x) ẋ")
        with attributed(problem.name, what):
            sol, stats = problem.adjoint.solve(lin, rhs, transpose)
        setattr(problem.stats, phase, enforce(stats, problem.on_failure, f"{problem.name}: {what}"))
        return sol.clone() if any(sol is t for t in (rhs, *z)) else sol

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, transpose, _rhs, *z = inputs
        ctx.problem, ctx.transpose = problem, transpose
        ctx.save_for_backward(*z, output)
        ctx.save_for_forward(*z, output)

    @staticmethod
    def backward(ctx, sol_bar):
        *z, sol = ctx.saved_tensors
        problem, transpose = ctx.problem, ctx.transpose
        q = LinearSolve.apply(problem, not transpose, sol_bar, *z)  # b̄ = K⁻ᵀ v̄
        needs = ctx.needs_input_grad[3:]
        z_bar = [None] * len(z)
        argnums = tuple(i for i, need in enumerate(needs) if need)
        if argnums:
            a, c = (sol, q) if transpose else (q, sol)
            grads = torch.func.grad(_bilinear(problem, a, c), argnums=argnums)(*z)
            for i, g in zip(argnums, grads):
                z_bar[i] = -g  # z̄ = −∇_z ⟨q, K(z) v⟩
        return None, None, q, *z_bar

    @staticmethod
    def jvp(ctx, _problem_dot, _transpose_dot, rhs_dot, *z_dot):
        *z, sol = ctx.saved_tensors
        problem, transpose = ctx.problem, ctx.transpose
        rhs = rhs_dot if rhs_dot is not None else torch.zeros_like(sol)
        if any(t is not None for t in z_dot):
            tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(z, z_dot))
            k_dot_v = jvp(_products(problem, transpose, sol), tuple(z), tangents)[1]
            rhs = rhs - k_dot_v  # v̇ = K⁻¹ (ḃ − K̇ v)
        return LinearSolve.apply(problem, transpose, rhs, *z)

    @staticmethod
    def vmap(info, in_dims, problem, transpose, rhs, *z):
        rhs_dim, z_dims = in_dims[2], in_dims[3:]
        V = info.batch_size
        rhs = rhs.movedim(rhs_dim, 0) if rhs_dim is not None else rhs.expand(V, *rhs.shape)
        if all(d is None for d in z_dims):
            # Only the right-hand side is batched: one factorization serves every column.
            return LinearSolve.apply(problem, transpose, rhs, *z), 0
        n_x = problem.n_x
        y_dim = z_dims[n_x]
        # rhs is (V, *extra, *y) with extra leading dims (several cotangents, as in jacrev);
        # the vmapped problem's batch is (V, *y's batch), and its solves take (*extra, V, *y).
        extra = rhs.ndim - 1 - (z[n_x].ndim - (y_dim is not None))
        rhs = rhs.movedim(0, extra)
        y = z[n_x].movedim(y_dim, 0) if y_dim is not None else z[n_x].expand(V, *z[n_x].shape)
        others = z[:n_x] + z[n_x + 1:]
        other_dims = z_dims[:n_x] + z_dims[n_x + 1:]
        if problem.broadcasts:
            xs = align_batch_dims(z[:n_x], z_dims[:n_x], problem.x_event_ndims)
            params = tuple(t.movedim(d, 0) if d is not None else t
                           for t, d in zip(z[n_x + 1:], z_dims[n_x + 1:]))
        else:
            moved = tuple(t.movedim(d, 0) if d is not None else t for t, d in zip(others, other_dims))
            xs, params = moved[:n_x], moved[n_x:]
        dims = tuple(0 if (d is not None or i == n_x) else None for i, d in enumerate(z_dims))
        vproblem = problem.vmapped(dims, info.randomness)
        return LinearSolve.apply(vproblem, transpose, rhs, *xs, y, *params), extra
