"""The Jacobian ``J = ∂f/∂y`` of a residual at a point, as a linear operator.

Right-hand sides may carry extra leading dims beyond ``y``'s own shape (several cotangents for
one solution, as in ``jacrev``); products then map over them with ``torch.func.vmap`` and the
dense factorization broadcasts, so ``J`` is factored once for all of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.compat import VjpFn, func_vjp
from implicit_layers.core.jvp import jvp
from implicit_layers.core.problem import ImplicitProblem
from implicit_layers.linalg.base import LinearOperator
from implicit_layers.solvers.base import RootProblem


class Linearization:
    """``J = ∂f/∂y`` at ``z = (*xs, y, *params)``.

    Attributes:
        problem: the :class:`ImplicitProblem`.
        y: the point.
        n: unknowns per sample; ``batch_shape``: the samples.
        aux: data the forward solver left for reuse (e.g. a factorization), or None (always
            None for a problem derived under ``vmap``, whose point is new).
    """

    def __init__(self, problem: ImplicitProblem, z: tuple[Tensor, ...]):
        self.problem, self.z = problem, z
        _, self.y, _ = problem.split(z)
        self.f_y = problem.residual_of_y(z)
        self.root_problem = RootProblem(self.f_y, problem.event_ndim)
        self.batch_shape = self.root_problem.batch_shape(self.y)
        self.n = self.y.shape[len(self.batch_shape):].numel()
        self.aux = problem.aux
        self._vjp: VjpFn | None = None

    def cached(self, tag: str, make):
        """``make()`` computed once for this point (see :meth:`ImplicitProblem.cached`)."""
        return self.problem.cached(tag, self.z, make)

    def _jvp(self, v: Tensor) -> Tensor:
        return jvp(self.f_y, (self.y,), (v,))[1]

    def _rvjp(self, w: Tensor) -> Tensor:
        if self._vjp is None:
            _, self._vjp = func_vjp(self.f_y, self.y)
        return self._vjp(w)[0]

    def _mapped(self, fn, v: Tensor) -> Tensor:
        """Apply ``fn`` (defined on ``y``-shaped tensors) to ``v`` of shape (*extra, *batch, n)."""
        extra = v.shape[: v.ndim - len(self.batch_shape) - 1]
        vy = v.reshape(-1, *self.y.shape) if len(extra) else v.reshape(self.y.shape)
        out = torch.func.vmap(fn)(vy) if len(extra) else fn(vy)
        return out.reshape(v.shape)

    def operator(self) -> LinearOperator:
        """``J`` on vectors of shape ``(*extra, *batch, n)``."""
        return LinearOperator(
            matvec=lambda v: self._mapped(self._jvp, v),
            rmatvec=lambda w: self._mapped(self._rvjp, w),
            batch_shape=self.batch_shape,
            n=self.n,
            dtype=self.y.dtype,
            device=self.y.device,
            dense=lambda: self.root_problem.jacobian(self.y),
        )

    def flatten(self, rhs: Tensor) -> Tensor:
        """``(*extra, *batch, *event) → (*extra, *batch, n)``."""
        return rhs.reshape(*rhs.shape[: rhs.ndim - self.problem.event_ndim], self.n)
