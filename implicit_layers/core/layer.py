"""The generic implicit layer: an ``nn.Module`` whose output solves ``residual(x, y) = 0``.

Every concrete layer of the package is an :class:`ImplicitLayer`: a residual, a forward solver
and an adjoint. Structured layers (QPs, Lyapunov equations) pass a residual that broadcasts
over batch dims, a solver that leaves its factorization in ``SolveResult.aux`` and an adjoint
that reuses it; the autograd machinery (:class:`~implicit_layers.core.implicit.ImplicitFunction`)
is the same for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from implicit_layers.checks import check_policy, check_same_dtype_device, check_tensor
from implicit_layers.compat import compiler_disable, module_parameters, parameter_slots, swapped_parameters
from implicit_layers.core.adjoint import Adjoint, DirectAdjoint
from implicit_layers.core.implicit import ImplicitFunction
from implicit_layers.core.independence import SampleCheck
from implicit_layers.core.problem import ImplicitProblem
from implicit_layers.stats import LayerStats

#: a layer's input ``x``: one Tensor, or a tuple (or list) of Tensors
Inputs = Tensor | Sequence[Tensor]


class _Maps(nn.Module):
    """Holds the user's residual (and optional fixed-point map and objective) so that their
    parameters are registered, and evaluates them with the autograd function's inputs in
    place of those parameters (:func:`~implicit_layers.compat.swapped_parameters`)."""

    def __init__(self, residual: Callable, fixed_point_map: Callable | None,
                 objective: Callable | None):
        super().__init__()
        self.residual, self.fixed_point_map, self.objective = residual, fixed_point_map, objective

    def forward(self, which: str, x: Inputs, y: Tensor) -> Tensor:
        return getattr(self, which)(x, y)

    def functional(self, which: str, packed: bool, params: tuple[Tensor, ...]):
        """``(xs, y, param_values) ↦ map(x, y)`` evaluated with ``param_values`` swapped in."""
        if getattr(self, which) is None:
            return None
        slots = parameter_slots(self, params)
        if not slots:
            return lambda xs, y, ps: self(which, tuple(xs) if packed else xs[0], y)

        def fn(xs, y, ps):
            with swapped_parameters(slots, ps):
                return self(which, tuple(xs) if packed else xs[0], y)
        return fn


class ImplicitLayer(nn.Module):
    """A layer whose output ``y`` solves ``residual(x, y) = 0``.

    Args:
        residual: ``(x, y) ↦ f`` shaped like ``y``; ``x`` is a Tensor or a tuple of Tensors.
            If it is an ``nn.Module`` its parameters receive gradients. A plain function must
            not close over tensors that need gradients: pass them through ``x`` instead.
        solver: the forward :class:`~implicit_layers.solvers.base.RootSolver`.
        adjoint: how backward/JVP systems are solved (default :class:`DirectAdjoint`).
        event_ndim: trailing dims of ``y`` that make one sample's unknown (default 1); the
            leading dims are a batch of independent samples. The layer checks that claim the
            first time it runs (and again after ``train()``/``eval()``) with ``⌈log₂ B⌉`` VJPs
            and raises ``ValueError`` if the residual mixes samples: declare the whole tensor
            as one unknown with ``event_ndim=y.ndim`` then.
        on_failure: ``"raise"`` (default) raises :class:`~implicit_layers.ConvergenceError`
            when a solve misses its tolerance; ``"warn"`` warns and continues.
        fixed_point_map: optional ``(x, y) ↦ y + f(x, y)`` evaluated directly (a DEQ cell).
        init: optional ``x ↦ y0`` used when ``forward`` gets no ``y0``.
        objective: optional ``(x, y) ↦ φ``, one value per sample, with ``∇_y φ = f`` (an
            argmin layer's objective, which minimizers descend).
        check_gradients: raise :class:`~implicit_layers.ConvergenceError` when the backward
            returns NaN/Inf from a finite cotangent (one reduction per gradient).

    Attributes:
        stats: :class:`~implicit_layers.stats.LayerStats` of the latest forward, backward
            and tangent solves.

    Raises:
        ValueError: malformed input (shape, dtype, NaN/Inf), naming the argument, or
            samples that interact although ``event_ndim`` declares them independent.
        ConvergenceError: a forward or adjoint solve missed its tolerance (policy "raise").
        SingularSystemError: ``∂f/∂y`` is singular at the solution.

    The layer may be called from several threads at once: evaluations of a module residual
    with the autograd function's inputs swapped in are serialized by a lock.

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
                 objective: Callable | None = None, check_gradients: bool = True):
        super().__init__()
        if not callable(residual):
            raise ValueError("residual must be callable (x, y) -> tensor shaped like y")
        if isinstance(event_ndim, bool) or not isinstance(event_ndim, int) or event_ndim < 0:
            raise ValueError(f"event_ndim must be an integer >= 0, got {event_ndim!r}")
        if solver is not None and not callable(getattr(solver, "solve", None)):
            raise ValueError(f"solver must be a solver instance (il.Newton(), il.Anderson(), ...), "
                             f"got {solver!r}")
        if adjoint is not None and not isinstance(adjoint, Adjoint):
            raise ValueError(f"adjoint must be an il.Adjoint instance (il.DirectAdjoint(), "
                             f"il.KrylovAdjoint(), ...), got {adjoint!r}")
        self.fn = _Maps(residual, fixed_point_map, objective)
        self.solver = solver
        self.adjoint = adjoint if adjoint is not None else DirectAdjoint()
        self.event_ndim = event_ndim
        self.on_failure = check_policy(on_failure)
        self.init = init
        self.check_gradients = check_gradients
        self.stats = LayerStats()
        self._sample_check = SampleCheck(type(self).__name__, event_ndim)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``forward(x, y0=None) → y`` (see :meth:`_forward`); subclasses take their own
        arguments (a QP's data, a DEQ's ``trajectory=``), which this open signature admits."""
        return self._forward(*args, **kwargs)

    def _forward(self, x: Inputs, y0: Tensor | None = None) -> Tensor:
        """``y`` with ``residual(x, y) = 0``, solved from ``y0`` (default ``init(x)``)."""
        packed = isinstance(x, (tuple, list))
        xs = tuple(x) if packed else (x,)
        names = tuple(f"x[{i}]" for i in range(len(xs))) if packed else ("x",)
        for name, t in zip(names, xs):
            check_tensor(name, t, finite=False)  # values: in the Function, once per call
        if y0 is None:
            if self.init is None:
                raise ValueError(f"{self._y0_name()} is required: this layer has no init to "
                                 f"guess it from x")
            y0 = self.init(x)
        check_tensor(self._y0_name(), y0, min_ndim=self.event_ndim, finite=False)
        check_same_dtype_device({self._y0_name(): y0, **dict(zip(names, xs))})
        params = tuple(p for p in module_parameters(self.fn) if p.requires_grad)
        return self._solve(xs, y0, params, packed=packed, x_names=names)

    def _y0_name(self) -> str:
        return "y0"

    @compiler_disable
    def _solve(self, xs: tuple[Tensor, ...], y0: Tensor, params: tuple[Tensor, ...] = (), *,
               packed: bool = True, sample_check: bool = True, residual=None, solver=None,
               **problem_options) -> Tensor:
        """Build this call's :class:`ImplicitProblem` and apply the implicit function.
        ``residual`` (``(xs, y) ↦ f``, no parameters) and ``solver`` replace the layer's for
        this call; ``problem_options`` are further fields of the problem (structured layers
        pass ``broadcasts``, ``x_event_ndims``, ``input_pullback``, ...)."""
        self.stats = LayerStats()
        fn = (self.fn.functional("residual", packed, params) if residual is None
              else lambda xs_, y, ps: residual(xs_, y))
        problem = ImplicitProblem(
            fn=fn, n_x=len(xs), event_ndim=self.event_ndim,
            solver=self.solver if solver is None else solver, adjoint=self.adjoint,
            on_failure=self.on_failure, stats=self.stats, name=type(self).__name__,
            fixed_point_fn=self.fn.functional("fixed_point_map", packed, params),
            objective_fn=self.fn.functional("objective", packed, params),
            y0_name=self._y0_name(), check_gradients=self.check_gradients,
            sample_check=self._sample_check.bind(self.training) if sample_check else None,
            **problem_options,
        )
        return ImplicitFunction.apply(problem, y0.detach(), *xs, *params)
