"""An implicit problem ``f(x, y; θ) = 0`` as the autograd functions see it.

The residual is evaluated in a functional form ``fn(xs, y, params)`` so that the parameters
``θ`` of a residual that is an ``nn.Module`` are ordinary inputs of the autograd functions and
receive gradients. Tensors travel as one flat tuple ``z = (*xs, y, *params)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from torch import Tensor

from implicit_layers.compat import any_wrapped
from implicit_layers.stats import LayerStats

Residual = Callable[[tuple[Tensor, ...], Tensor, tuple[Tensor, ...]], Tensor]
#: ``(z, w, wanted) ↦ {i: −(∂f/∂z_i)ᵀ w}``: a closed-form pullback of the residual
InputPullback = Callable[[tuple[Tensor, ...], Tensor, tuple[int, ...]], dict[int, Tensor]]
_T = TypeVar("_T")


@dataclass
class ImplicitProblem:
    """Everything the autograd functions need besides the tensors.

    Attributes:
        fn: ``(xs, y, params) ↦ f`` shaped like ``y``.
        n_x: number of input tensors ``xs``.
        event_ndim: trailing dims of ``y`` that form one sample.
        solver: the forward solver (a :class:`~implicit_layers.solvers.base.RootSolver`).
        adjoint: the :class:`~implicit_layers.core.adjoint.Adjoint` for backward/JVP systems.
        on_failure: ``"raise"`` or ``"warn"``.
        stats: where the stats of each solve are recorded.
        name: the layer's name, for messages.
        fixed_point_fn: optional ``(xs, y, params) ↦ g`` with ``g = y + f`` (a DEQ cell).
        objective_fn: optional ``(xs, y, params) ↦ φ`` per sample with ``∇_y φ = f`` (argmin).
        x_names: the inputs' names in messages (default ``x`` / ``x[i]``).
        y0_name: the initial guess's name in messages.
        broadcasts: the residual accepts extra leading batch dims on every tensor and
            broadcasts over them (structured layers); otherwise ``vmap`` wraps it.
        x_event_ndims: with ``broadcasts``, the number of non-batch trailing dims of each
            input (to align batch dims under ``vmap``).
        sample_check: ``(residual_of_y, y) ↦ None``, raising when the samples of ``y``
            interact (see :mod:`~implicit_layers.core.independence`), or None.
        check_gradients: raise when the backward returns NaN/Inf from a finite cotangent.
        check_inputs: reject NaN/Inf inputs before the solve (a solver that detects them
            itself, at no extra cost, turns this off).
        input_pullback: optional closed form of ``−(∂f/∂z_i)ᵀ w`` (a speed override of the
            generic VJP; it must be differentiable for double backward).
        aux: what the forward solver left for the adjoint (e.g. a factorization at ``y*``).
        cache: the adjoint's own factorizations at ``y*`` (plain tensors only).
    """

    fn: Residual
    n_x: int
    event_ndim: int
    solver: Any
    adjoint: Any
    on_failure: str = "raise"
    stats: LayerStats = field(default_factory=LayerStats)
    name: str = "ImplicitLayer"
    fixed_point_fn: Residual | None = None
    objective_fn: Residual | None = None
    x_names: tuple[str, ...] = ()
    y0_name: str = "y0"
    broadcasts: bool = False
    x_event_ndims: tuple[int, ...] = ()
    sample_check: Any = None
    check_gradients: bool = True
    check_inputs: bool = True
    input_pullback: InputPullback | None = None
    aux: Any = None
    cache: dict = field(default_factory=dict)

    def split(self, z: tuple[_T, ...]) -> tuple[tuple[_T, ...], _T, tuple[_T, ...]]:
        """``z = (*xs, y, *params)`` (tensors, or one in-dim per tensor) as ``(xs, y, params)``."""
        return tuple(z[: self.n_x]), z[self.n_x], tuple(z[self.n_x + 1 :])

    def residual_of_y(self, z: tuple[Tensor, ...]) -> Callable[[Tensor], Tensor]:
        xs, _, params = self.split(z)
        return lambda y: self.fn(xs, y, params)

    def residual_of_z(self, *z: Tensor) -> Tensor:
        xs, y, params = self.split(z)
        return self.fn(xs, y, params)

    def vmapped(self, dims: tuple[int | None, ...], randomness: str = "error") -> ImplicitProblem:
        """The same problem for inputs with one more leading batch dim.

        ``dims`` gives, for each tensor of ``z``, 0 if it carries the new dim and None if not.
        A residual that does not broadcast by itself is wrapped in ``torch.func.vmap``; one
        that does gets size-1 leading dims on the tensors without the new dim (the callers
        align them). The forward solver's ``aux`` belongs to the old point and is dropped.
        """
        if self.broadcasts:
            return replace(self, aux=None, cache={}, sample_check=None)
        xd, yd, pd = self.split(dims)

        def lift(fn: Residual) -> Residual:
            return lambda xs, y, ps: torch.func.vmap(
                fn, in_dims=(tuple(xd), yd, tuple(pd)), randomness=randomness
            )(xs, y, ps)

        return replace(self, fn=lift(self.fn),
                       fixed_point_fn=None if self.fixed_point_fn is None else lift(self.fixed_point_fn),
                       objective_fn=None if self.objective_fn is None else lift(self.objective_fn),
                       input_pullback=None, aux=None, cache={}, sample_check=None)

    def cached(self, tag: str, z: tuple[Tensor, ...], make: Callable[[], Any]) -> Any:
        """``make()``, computed once per problem for the point ``z`` of this call (every solve
        of one problem is at its solution). Not cached for ``torch.func`` wrappers, which must
        not leak into another transform level."""
        if any_wrapped(*z):
            return make()
        if tag not in self.cache:
            self.cache[tag] = make()
        return self.cache[tag]


def align_batch_dims(tensors, dims, event_ndims) -> tuple[Tensor, ...]:
    """For a residual that broadcasts: the vmapped dim of each tensor goes first (size 1
    where a tensor has none), and every tensor's own batch dims are padded on the left to a
    common count, so that they broadcast sample by sample as they would logically."""
    logical = [t.ndim - e - (d is not None) for t, d, e in zip(tensors, dims, event_ndims, strict=True)]
    width = max(logical, default=0)
    out = []
    for t, d, nb in zip(tensors, dims, logical, strict=True):
        t = t.movedim(d, 0) if d is not None else t.unsqueeze(0)
        out.append(t.reshape(t.shape[0], *([1] * (width - nb)), *t.shape[1:]))
    return tuple(out)
