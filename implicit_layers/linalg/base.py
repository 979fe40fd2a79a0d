"""The linear-solver interface: factor once, solve many, transpose for free.

A :class:`LinearOperator` is a batch of square operators acting on vectors of shape
``(*batch, n)``. A :class:`LinearSolver` turns one into a :class:`Factorization`, whose
``solve(b, transpose=False)`` answers ``A x = b`` or ``Aᵀ x = b`` as often as needed. Dense
solvers factor the materialized matrices once; Krylov solvers keep the operator and iterate.

>>> import torch
>>> from implicit_layers.linalg import LU, LinearOperator
>>> A = torch.tensor([[4., 1.], [2., 3.]], dtype=torch.float64)
>>> fac = LU().factor(LinearOperator.from_dense(A))
>>> fac.solve(torch.tensor([1., 2.], dtype=torch.float64))
tensor([0.1000, 0.6000], dtype=torch.float64)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from implicit_layers.stats import SolverStats


class LinearOperator:
    """A batch of ``n × n`` operators given by products and/or the dense matrices.

    Args:
        matvec: ``v ↦ A v`` on tensors of shape ``(*batch, n)``.
        rmatvec: ``w ↦ Aᵀ w`` on the same shapes.
        batch_shape, n, dtype, device: what the vectors look like.
        dense: a callable returning the ``(*batch, n, n)`` matrices (materialized on demand).
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor] | None,
        rmatvec: Callable[[Tensor], Tensor] | None,
        batch_shape: tuple[int, ...],
        n: int,
        dtype: torch.dtype,
        device: torch.device,
        dense: Callable[[], Tensor] | None = None,
    ):
        self._matvec, self._rmatvec, self._dense = matvec, rmatvec, dense
        self.batch_shape, self.n, self.dtype, self.device = tuple(batch_shape), n, dtype, device

    @classmethod
    def from_dense(cls, A: Tensor) -> LinearOperator:
        return cls(
            matvec=lambda v: (A @ v.unsqueeze(-1)).squeeze(-1),
            rmatvec=lambda w: (A.mT @ w.unsqueeze(-1)).squeeze(-1),
            batch_shape=A.shape[:-2],
            n=A.shape[-1],
            dtype=A.dtype,
            device=A.device,
            dense=lambda: A,
        )

    def matvec(self, v: Tensor, transpose: bool = False) -> Tensor:
        fn = self._rmatvec if transpose else self._matvec
        if fn is None:
            raise NotImplementedError("this operator has no " + ("rmatvec" if transpose else "matvec"))
        return fn(v)

    def to_dense(self) -> Tensor:
        if self._dense is None:
            raise NotImplementedError("this operator cannot be materialized")
        return self._dense()


class Factorization(ABC):
    """The result of :meth:`LinearSolver.factor`: solves with the operator or its transpose."""

    #: stats of the most recent solve (iterations etc.; exact solves report one step)
    stats: SolverStats | None = None

    @abstractmethod
    def solve(self, b: Tensor, transpose: bool = False) -> Tensor:
        """Solve ``A x = b`` (or ``Aᵀ x = b``) for ``b`` of shape ``(*batch, n)``."""


class LinearSolver(ABC):
    """Turns a :class:`LinearOperator` into a :class:`Factorization`."""

    #: True when factor() needs the dense matrices (LU, Cholesky), False for matrix-free ones
    needs_dense: bool = True

    @abstractmethod
    def factor(self, op: LinearOperator) -> Factorization: ...
