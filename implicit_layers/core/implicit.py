"""The generic implicit layer: ``y = y*(x)`` defined by ``f(x, y; θ) = 0``.

Derivation (``J = ∂f/∂y`` at the solution, ``z = (x, θ)``):

    pushforward:  J ẏ + (∂f/∂z) ż = 0          ⇒  ẏ = −J⁻¹ (∂f/∂z) ż
    pullback:     ⟨ȳ, ẏ⟩ = −⟨J⁻ᵀ ȳ, (∂f/∂z) ż⟩   ⇒  w = J⁻ᵀ ȳ,  z̄ = −(∂f/∂z)ᵀ w

The forward solve runs outside the autograd graph; the backward needs one transposed solve
with ``J`` and one VJP of the residual, the JVP one solve and one JVP of the residual. The
solves go through :class:`~implicit_layers.core.linear_solve.LinearSolve`, itself
differentiable, so double backward works; memory is independent of the solver's iterations.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from implicit_layers.checks import check_policy, check_same_dtype_device, check_tensor
from implicit_layers.core.adjoint import Adjoint, DirectAdjoint
from implicit_layers.core.jvp import jvp
from implicit_layers.core.linear_solve import LinearSolve
from implicit_layers.core.problem import ImplicitProblem
from implicit_layers.solvers.base import RootProblem
from implicit_layers.stats import LayerStats, enforce


class ImplicitFunction(torch.autograd.Function):
    """``ImplicitFunction.apply(problem, y0, *xs, *params) → y`` with ``f(xs, y; params) = 0``.

    The autograd Function behind :class:`ImplicitLayer`; use the layer unless you need to build
    an :class:`~implicit_layers.core.problem.ImplicitProblem` by hand.

    >>> import torch, implicit_layers as il
    >>> from implicit_layers.core.problem import ImplicitProblem
    >>> prob = ImplicitProblem(fn=lambda xs, y, ps: y * y - xs[0], n_x=1, event_ndim=0,
    ...                        solver=il.Newton(), adjoint=il.DirectAdjoint())
    >>> x = torch.tensor([4.0], dtype=torch.float64, requires_grad=True)
    >>> y = il.ImplicitFunction.apply(prob, torch.ones(1, dtype=torch.float64), x)
    >>> y.detach(), torch.autograd.grad(y.sum(), x)[0]  # sqrt(x), 1 / (2 sqrt(x))
    (tensor([2.0000], dtype=torch.float64), tensor([0.2500], dtype=torch.float64))"""

    @staticmethod
    def forward(problem: ImplicitProblem, y0: Tensor, *tensors: Tensor) -> Tensor:
        xs, params = tensors[: problem.n_x], tensors[problem.n_x :]
        # value checks run here, on plain tensors (also under vmap), once per call
        for i, x in enumerate(xs):
            check_tensor(f"x[{i}]" if problem.n_x > 1 else "x", x)
        check_tensor("y0", y0)
        root = RootProblem(
            residual=lambda y: problem.fn(xs, y, params),
            event_ndim=problem.event_ndim,
            fixed_point_map=(lambda y: problem.fixed_point_fn(xs, y, params))
            if problem.fixed_point_fn is not None else None,
            objective=(lambda y: problem.objective_fn(xs, y, params))
            if problem.objective_fn is not None else None,
        )
        result = problem.solver.solve(root, y0)
        problem.stats.forward = enforce(result.stats, problem.on_failure, "forward solve f(x, y) = 0")
        y = result.y
        if any(y is t for t in (y0, *tensors)):  # autograd needs a fresh output tensor
            y = y.clone()
        if result.aux is not None:  # e.g. a factorization at y*, for a custom adjoint
            key = problem.cache_key("forward_aux", (*xs, y, *params))
            if key is not None:
                problem.cache[key] = result.aux
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, _y0, *tensors = inputs
        ctx.problem = problem
        ctx.save_for_backward(*tensors, output)
        ctx.save_for_forward(*tensors, output)

    @staticmethod
    def _z(ctx) -> tuple[Tensor, ...]:
        *tensors, y = ctx.saved_tensors
        n_x = ctx.problem.n_x
        return (*tensors[:n_x], y, *tensors[n_x:])

    @staticmethod
    def backward(ctx, y_bar):
        problem = ctx.problem
        z = ImplicitFunction._z(ctx)
        needs = ctx.needs_input_grad[2:]
        if not any(needs):
            return (None,) * (len(z) + 1)
        w = LinearSolve.apply(problem, True, y_bar, *z)  # Jᵀ w = ȳ
        wrt = tuple(i for i in range(len(z)) if i != problem.n_x)  # every input but y
        wanted = tuple(i for i, need in zip(wrt, needs) if need)
        _, vjp_fn = torch.func.vjp(
            lambda *zs: problem.residual_of_z(*_put(z, wanted, zs)), *(z[i] for i in wanted)
        )
        grads = dict(zip(wanted, vjp_fn(w)))
        return None, None, *(-grads[i] if i in grads else None for i in wrt)  # z̄ = −(∂f/∂z)ᵀ w

    @staticmethod
    def jvp(ctx, _problem_dot, _y0_dot, *tangents):
        problem = ctx.problem
        z = ImplicitFunction._z(ctx)
        wrt = tuple(i for i in range(len(z)) if i != problem.n_x)
        moving = tuple((i, t) for i, t in zip(wrt, tangents) if t is not None)
        if not moving:
            return torch.zeros_like(z[problem.n_x])
        idx, dots = zip(*moving)
        _, f_dot = jvp(
            lambda *zs: problem.residual_of_z(*_put(z, idx, zs)), tuple(z[i] for i in idx), dots
        )
        return LinearSolve.apply(problem, False, -f_dot, *z)  # J ẏ = −(∂f/∂z) ż

    @staticmethod
    def vmap(info, in_dims, problem, y0, *tensors):
        y0_dim, dims = in_dims[1], in_dims[2:]
        B = info.batch_size
        tensors = tuple(t.movedim(d, 0) if d is not None else t for t, d in zip(tensors, dims))
        y0 = y0.movedim(y0_dim, 0) if y0_dim is not None else y0.expand(B, *y0.shape)
        n_x = problem.n_x
        z_dims = tuple(0 if d is not None else None for d in dims)
        vproblem = problem.vmapped((*z_dims[:n_x], 0, *z_dims[n_x:]), info.randomness)
        return ImplicitFunction.apply(vproblem, y0.contiguous(), *tensors), 0


def _put(z: tuple[Tensor, ...], idx: tuple[int, ...], values: tuple[Tensor, ...]):
    """``z`` with the entries at ``idx`` replaced by ``values``."""
    out = list(z)
    for i, v in zip(idx, values):
        out[i] = v
    return tuple(out)


def _parameter_slots(module: nn.Module, params: tuple[Tensor, ...]) -> list[tuple[nn.Module, str, int]]:
    """Every ``(submodule, name)`` that holds one of ``params``, with the parameter's index.

    A module reachable along two paths (a DEQ cell that is both the residual's and the
    fixed-point map's) is listed once, so swapping cannot stack on itself.
    """
    index = {id(p): i for i, p in enumerate(params)}
    return [(m, name, index[id(p)]) for m in module.modules()
            for name, p in m._parameters.items() if p is not None and id(p) in index]


@contextmanager
def _swapped(slots, values: tuple[Tensor, ...]):
    """Evaluate a module with ``values`` in place of its parameters, restoring them after
    (last in, first out). ``torch.func.functional_call`` restores tied names in the wrong
    order when one submodule is registered twice, leaving plain tensors behind."""
    saved = []
    try:
        for m, name, i in slots:
            saved.append((m, name, m._parameters[name]))
            m._parameters[name] = values[i]
        yield
    finally:
        for m, name, p in reversed(saved):
            m._parameters[name] = p


class _Residual(nn.Module):
    """Holds the user's residual (and optional fixed-point map and objective) so that their
    parameters are registered and can be swapped for the autograd function's inputs (see
    :func:`_swapped`)."""

    def __init__(self, residual: Callable, fixed_point_map: Callable | None,
                 objective: Callable | None = None):
        super().__init__()
        self.residual, self.fixed_point_map, self.objective = residual, fixed_point_map, objective

    def forward(self, which: str, x, y):
        fn = {"f": self.residual, "g": self.fixed_point_map, "objective": self.objective}[which]
        return fn(x, y)


class ImplicitLayer(nn.Module):
    """A layer whose output ``y`` solves ``residual(x, y) = 0``.

    Args:
        residual: ``(x, y) ↦ f`` shaped like ``y``; ``x`` is a Tensor or a tuple of Tensors.
            If it is an ``nn.Module`` its parameters receive gradients. A plain function must
            not close over tensors that need gradients: pass them through ``x`` instead.
            Leading dims of ``y`` are batch dims and samples must not interact.
        solver: the forward :class:`~implicit_layers.solvers.base.RootSolver`.
        adjoint: how backward/JVP systems are solved (default :class:`DirectAdjoint`).
        event_ndim: trailing dims of ``y`` that make one sample's unknown (default 1).
        on_failure: ``"raise"`` (default) raises :class:`~implicit_layers.ConvergenceError`
            when a solve misses its tolerance; ``"warn"`` warns and continues.
        fixed_point_map: optional ``(x, y) ↦ y + f(x, y)`` evaluated directly (a DEQ cell).
        objective: optional ``(x, y) ↦ φ``, one value per sample, with ``∇_y φ = f`` (an
            argmin layer's objective, which minimizers descend).
        init: optional ``x ↦ y0`` used when ``forward`` gets no ``y0``.

    Attributes:
        stats: :class:`~implicit_layers.stats.LayerStats` of the latest forward, backward
            and tangent solves.

    Raises:
        ValueError: malformed input (shape, dtype, NaN/Inf), naming the argument.
        ConvergenceError: a forward or adjoint solve missed its tolerance (policy "raise").
        SingularSystemError: ``∂f/∂y`` is singular at the solution.

    >>> import torch, implicit_layers as il
    >>> layer = il.ImplicitLayer(lambda x, y: y ** 3 - x, il.Newton())   # y = cbrt(x)
    >>> x = torch.tensor([8.0, 27.0], dtype=torch.float64, requires_grad=True)
    >>> y = layer(x, torch.ones(2, dtype=torch.float64))
    >>> y.sum().backward(); x.grad                                        # 1 / (3 y²)
    tensor([0.0833, 0.0370], dtype=torch.float64)
    """

    def __init__(self, residual: Callable, solver, adjoint: Adjoint | None = None, *,
                 event_ndim: int = 1, on_failure: str = "raise",
                 fixed_point_map: Callable | None = None, init: Callable | None = None,
                 objective: Callable | None = None):
        super().__init__()
        if not callable(residual):
            raise ValueError("residual must be callable (x, y) -> tensor shaped like y")
        if event_ndim < 0:
            raise ValueError(f"event_ndim must be >= 0, got {event_ndim}")
        self.fn = _Residual(residual, fixed_point_map, objective)
        self.solver = solver
        self.adjoint = adjoint if adjoint is not None else DirectAdjoint()
        self.event_ndim = event_ndim
        self.on_failure = check_policy(on_failure)
        self.init = init
        self.stats = LayerStats()

    def forward(self, x, y0: Tensor | None = None) -> Tensor:
        packed = isinstance(x, (tuple, list))
        xs = tuple(x) if packed else (x,)
        for i, t in enumerate(xs):
            check_tensor(f"x[{i}]" if packed else "x", t, finite=False)  # values: in the Function
        if y0 is None:
            if self.init is None:
                raise ValueError("y0 is required: this layer has no init to guess it from x")
            y0 = self.init(x)
        check_tensor("y0", y0, min_ndim=self.event_ndim, finite=False)
        check_same_dtype_device({"y0": y0, **{f"x[{i}]": t for i, t in enumerate(xs)}})
        params = tuple(p for p in self.fn.parameters() if p.requires_grad)
        slots = _parameter_slots(self.fn, params)

        def call(which):
            def fn(xs_, y, ps):
                with _swapped(slots, ps):
                    return self.fn(which, tuple(xs_) if packed else xs_[0], y)
            return fn

        self.stats = LayerStats()
        problem = ImplicitProblem(
            fn=call("f"), n_x=len(xs), event_ndim=self.event_ndim, solver=self.solver,
            adjoint=self.adjoint, on_failure=self.on_failure, stats=self.stats,
            fixed_point_fn=call("g") if self.fn.fixed_point_map is not None else None,
            objective_fn=call("objective") if self.fn.objective is not None else None,
        )
        return ImplicitFunction.apply(problem, y0.detach(), *xs, *params)
