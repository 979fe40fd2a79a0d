"""An implicit problem ``f(x, y; θ) = 0`` as the autograd functions see it.

The residual is evaluated in a functional form ``fn(xs, y, params)`` so that the parameters
``θ`` of a residual that is an ``nn.Module`` are ordinary inputs of the autograd functions and
receive gradients. Tensors travel as one flat tuple ``z = (*xs, y, *params)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from implicit_layers.stats import LayerStats

Residual = Callable[[tuple[Tensor, ...], Tensor, tuple[Tensor, ...]], Tensor]


@dataclass
class ImplicitProblem:
    """Everything the autograd functions need besides the tensors.

    Attributes:
        fn: ``(xs, y, params) ↦ f`` shaped like ``y``.
        n_x: number of input tensors ``xs``.
        event_ndim: trailing dims of ``y`` that form one sample.
        solver: the forward :class:`~implicit_layers.solvers.base.RootSolver`.
        adjoint: the :class:`~implicit_layers.core.adjoint.Adjoint` for backward/JVP systems.
        on_failure: ``"raise"`` or ``"warn"``.
        stats: where the stats of each solve are recorded.
        fixed_point_fn: optional ``(xs, y, params) ↦ g`` with ``g = y + f`` (a DEQ cell).
        objective_fn: optional ``(xs, y, params) ↦ φ`` per sample with ``∇_y φ = f`` (argmin).
        cache: factorizations and forward-solver data, keyed by the tensors they belong to.
    """

    fn: Residual
    n_x: int
    event_ndim: int
    solver: Any
    adjoint: Any
    on_failure: str = "raise"
    stats: LayerStats = field(default_factory=LayerStats)
    fixed_point_fn: Residual | None = None
    objective_fn: Residual | None = None
    cache: dict = field(default_factory=dict)

    def split(self, z: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], Tensor, tuple[Tensor, ...]]:
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
        The residual is wrapped in ``torch.func.vmap``, so it need not broadcast by itself.
        """
        xd, yd, pd = self.split(dims)

        def lift(fn: Residual | None) -> Residual | None:
            if fn is None:
                return None
            return lambda xs, y, ps: torch.func.vmap(
                fn, in_dims=(tuple(xd), yd, tuple(pd)), randomness=randomness
            )(xs, y, ps)

        return replace(self, fn=lift(self.fn), fixed_point_fn=lift(self.fixed_point_fn),
                       objective_fn=lift(self.objective_fn), cache={})

    # -- cache of factorizations / forward data, valid for plain tensors only ------------
    def cache_key(self, tag: str, tensors: tuple[Tensor, ...]):
        """A key identifying ``tensors`` by storage and version, or None under torch.func
        transforms (whose wrapped tensors must not leak into another level)."""
        if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
            return None
        return (tag,) + tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in tensors)

    def cached(self, key, make: Callable[[], Any]) -> Any:
        if key is None:
            return make()
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]
