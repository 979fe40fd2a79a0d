"""Deep-equilibrium layer: ``z* = cell(x, z*)``, differentiated implicitly.

The layer is the generic :class:`~implicit_layers.ImplicitLayer` with the residual
``f(x, z) = cell(x, z) − z`` and the cell itself as the fixed-point map, so fixed-point solvers
(:class:`~implicit_layers.Anderson`, :class:`~implicit_layers.Picard`) iterate the cell while
root solvers (:class:`~implicit_layers.Broyden`) see ``f``. With ``J = ∂cell/∂z`` at ``z*``:

    reverse mode:  (J − I)ᵀ w = z̄,  i.e. the adjoint fixed point u = Jᵀ u + z̄ with u = −w;
                   x̄ = −(∂f/∂x)ᵀ w = (∂cell/∂x)ᵀ u and θ̄ = (∂cell/∂θ)ᵀ u
    forward mode:  ż = J ż + (∂cell/∂x) ẋ   (the tangent fixed point)

The default adjoint iterates the adjoint fixed point with Anderson
(:class:`~implicit_layers.FixedPointAdjoint`); any other adjoint plugs in — GMRES through
:class:`~implicit_layers.KrylovAdjoint`, or the approximations
:class:`~implicit_layers.PhantomAdjoint` / :class:`~implicit_layers.JacobianFreeAdjoint`.
Only ``z*`` and the inputs are saved for backward: memory does not grow with the number of
forward iterations. Double backward, ``torch.func.jvp``/``jacfwd``/``vmap`` come from the core.

Training aids: ``forward(x, z0)`` warm-starts the solve (pass a sample's previous equilibrium;
the solve stops at once if it still meets the tolerance), and ``forward(x, trajectory=k)``
returns ``k`` states of the solve for fixed-point correction (see
:mod:`~implicit_layers.layers.deq.trajectory`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from implicit_layers.compat import is_wrapped
from implicit_layers.core.adjoint import Adjoint, FixedPointAdjoint
from implicit_layers.core.layer import ImplicitLayer, Inputs
from implicit_layers.layers.deq.stability import (
    jacobian_frobenius_estimate,
    spectral_radius,
    warn_off_equilibrium,
)
from implicit_layers.layers.deq.trajectory import GivenPoint, Recording, TrajectoryRecorder
from implicit_layers.solvers.anderson import Anderson
from implicit_layers.solvers.base import RootSolver


def _fixed_point_residual(cell: Callable, x, z: Tensor) -> Tensor:
    """``f(x, z) = cell(x, z) − z``. Bound with ``functools.partial`` rather than a lambda so
    that ``copy.deepcopy`` and pickling carry the residual over to the copied cell; not a
    module, so the cell's parameters are registered once (under the fixed-point map)."""
    out = cell(x, z)
    if out.shape != z.shape:
        raise ValueError(f"the cell returned shape {tuple(out.shape)}, expected z's shape "
                         f"{tuple(z.shape)}")
    return out - z


def _zeros_like_x(x) -> Tensor:
    return torch.zeros_like(x[0] if isinstance(x, (tuple, list)) else x)


class DEQLayer(ImplicitLayer):
    """A deep-equilibrium layer ``z = cell(x, z)``.

    Args:
        cell: ``(x, z) ↦ z`` (an ``nn.Module`` or a function); an ``nn.Module``'s parameters
            receive gradients. ``x`` may be a Tensor or a tuple of Tensors. Leading dims of
            ``z`` are batch dims and samples must not interact.
        solver: forward solver (default :class:`~implicit_layers.Anderson`).
        adjoint: backward/tangent solver (default ``FixedPointAdjoint(Anderson())``, the
            implicit gradient); see the module docstring for the alternatives.
        event_ndim: trailing dims of ``z`` forming one sample (default 1).
        on_failure: ``"raise"`` (default) raises :class:`~implicit_layers.ConvergenceError`
            when the forward or adjoint solve misses its tolerance; ``"warn"`` warns
            (:class:`~implicit_layers.ConvergenceWarning`) and continues.
        init: ``x ↦ z0`` used when ``forward`` gets no ``z0`` (default: zeros shaped like
            ``x``, or like ``x[0]`` for a tuple; pass ``z0`` or ``init`` when ``z`` is shaped
            differently).
        warn_residual: when grad is required and some sample's residual
            ``‖cell(x, z) − z‖`` at the returned point exceeds ``tol + warn_residual · ‖z‖``
            (``tol``: the solver's absolute tolerance), a ``ConvergenceWarning`` says the
            implicit gradient is inaccurate (None disables; skipped inside ``torch.func``
            transforms).
        trajectory_adjoint: the adjoint of the intermediate states returned by
            ``forward(x, trajectory=k)`` (default: ``adjoint``, the implicit gradient at each
            state; e.g. ``PhantomAdjoint(k=3)`` for the cheaper phantom gradient).

    Attributes:
        stats: :class:`~implicit_layers.LayerStats` of the latest forward, backward and tangent
            solves (iterations, residual trace, converged mask per sample).

    Raises:
        ValueError: malformed input (shape, dtype, NaN/Inf), naming the argument.
        ConvergenceError: a solve missed its tolerance (policy "raise") or produced NaN/Inf.

    >>> import torch, implicit_layers as il
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> class Cell(torch.nn.Module):
    ...     def __init__(self, d):
    ...         super().__init__()
    ...         self.W = torch.nn.Linear(d, d, bias=False, dtype=torch.float64)
    ...     def forward(self, x, z):
    ...         return torch.tanh(0.5 * self.W(z) + x)
    >>> layer = il.DEQLayer(Cell(4))
    >>> x = torch.randn(8, 4, dtype=torch.float64)
    >>> z = layer(x)
    >>> float((layer.cell(x, z) - z).detach().abs().max()) < 1e-9
    True
    >>> z.square().sum().backward()
    >>> layer.cell.W.weight.grad.shape, layer.stats.backward.all_converged
    (torch.Size([4, 4]), True)
    """

    def __init__(self, cell: Callable, solver: RootSolver | None = None,
                 adjoint: Adjoint | None = None, *, event_ndim: int = 1,
                 on_failure: str = "raise", init: Callable | None = None,
                 warn_residual: float | None = 1e-3, trajectory_adjoint: Adjoint | None = None):
        if not callable(cell):
            raise ValueError("cell must be callable (x, z) -> z")
        if warn_residual is not None and not warn_residual > 0:
            raise ValueError(f"warn_residual must be positive or None, got {warn_residual}")
        super().__init__(
            functools.partial(_fixed_point_residual, cell),
            solver if solver is not None else Anderson(),
            adjoint if adjoint is not None else FixedPointAdjoint(Anderson()),
            event_ndim=event_ndim, on_failure=on_failure, fixed_point_map=cell,
            init=init if init is not None else _zeros_like_x,
        )
        self.warn_residual = warn_residual
        self.trajectory_adjoint = trajectory_adjoint if trajectory_adjoint is not None \
            else self.adjoint

    def _y0_name(self) -> str:
        return "z0"

    @property
    def cell(self) -> Callable:
        cell = self.fn.fixed_point_map
        assert cell is not None, "a DEQLayer's fixed-point map is its cell"
        return cell

    def forward(self, x: Inputs, z0: Tensor | None = None, *,
                trajectory: int | None = None) -> Tensor | list[Tensor]:
        """Solve ``z = cell(x, z)`` from ``z0`` (default ``init(x)``); returns ``z*``.

        Args:
            x: the input (a Tensor or a tuple of Tensors).
            z0: the starting point; pass the previous equilibrium of the same sample to
                warm-start the solve (see the class docstring).
            trajectory: ``k`` to return ``k`` states ``[z_1, …, z_k]`` of the solve instead,
                ``z_k = z*`` and ``z_i`` the kept iterate nearest to iteration ``i·K/k`` of the
                ``K`` iterations, each differentiable with the ``trajectory_adjoint`` at its
                own point (fixed-point correction; the iterations are in
                ``stats.forward.extra["trajectory"]``).
        """
        if trajectory is None:
            z = super().forward(x, z0)
        else:
            if any(is_wrapped(t) for t in (x if isinstance(x, (tuple, list)) else (x,))):
                raise ValueError("trajectory= is not supported inside torch.func transforms "
                                 "(vmap, grad, jacrev, ...): the states are recorded from the "
                                 "solver, which runs on the unwrapped batch")
            recorder = TrajectoryRecorder(trajectory)
            solve = self._sibling(Recording(self.solver, recorder), self.adjoint)
            z = solve(x, z0)
            self.stats = solve.stats  # the same object receives the backward's stats
        if (self.warn_residual is not None and z.requires_grad and self.stats.forward is not None
                and not is_wrapped(z)):
            warn_off_equilibrium(self.stats.forward.residual, z, self.warn_residual,
                                 self.event_ndim, where=type(self).__name__,
                                 atol=self._absolute_tolerance(z.dtype))
        if trajectory is None:
            return z
        forward = self.stats.forward
        assert forward is not None, "the recorded solve reported its stats"
        last = int(forward.iterations.max()) if z.numel() else 0
        iterations, states = recorder.pick(last)
        forward.extra["trajectory"] = [*iterations, last]
        at_point = self._sibling(GivenPoint(), self.trajectory_adjoint)
        return [at_point(x, state) for state in states] + [z]

    def _absolute_tolerance(self, dtype: torch.dtype) -> float:
        tolerances = getattr(self.solver, "tolerances", None)
        return tolerances(dtype)[0] if tolerances is not None else 0.0

    def _sibling(self, solver: RootSolver, adjoint: Adjoint) -> ImplicitLayer:
        """A generic layer on the same cell with another solver and adjoint (not registered
        as a submodule: the cell's parameters stay registered once, here)."""
        return ImplicitLayer(self.fn.residual, solver, adjoint, event_ndim=self.event_ndim,
                             on_failure=self.on_failure, fixed_point_map=self.cell,
                             init=self.init)

    def jacobian_regularization(self, x, z: Tensor, samples: int = 1,
                                generator: torch.Generator | None = None) -> Tensor:
        """Hutchinson estimate of ``‖∂cell/∂z‖²_F`` at ``(x, z)`` per sample, differentiable
        in the cell's parameters (and ``x``): add ``weight * est.mean()`` to the loss."""
        return jacobian_frobenius_estimate(lambda zz: self.cell(x, zz), z,
                                           event_ndim=self.event_ndim, samples=samples,
                                           generator=generator)

    def spectral_radius(self, x, z: Tensor, iters: int = 30,
                        generator: torch.Generator | None = None) -> Tensor:
        """Power-iteration estimate of the spectral radius of ``∂cell/∂z`` at ``(x, z)``."""
        return spectral_radius(lambda zz: self.cell(x, zz), z, event_ndim=self.event_ndim,
                               iters=iters, generator=generator)
