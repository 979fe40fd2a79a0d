"""EqualityQPLayer: a differentiable equality-constrained quadratic program.

    x*(Q, c, A, b) = argmin_x ½ xᵀQx + cᵀx   s.t.  Ax = b
    KKT:  Qx + c + Aᵀλ = 0,  Ax = b         →  outputs (x, λ)

Gradients flow from x and λ to all four inputs through the implicit function theorem on the
KKT system; every backend factors the KKT matrix once and reuses the factorization for the
backward, the JVP and higher derivatives. Q is read as its symmetric part ``(Q + Qᵀ)/2``
and receives a symmetric gradient; an input broadcast along batch dims receives the sum of
the per-sample gradients.

Backends (``backend=`` takes an instance, or a name in configs):

* ``"dense"`` — :class:`DenseKKTBackend`: batched torch ops (CPU/CUDA), Cholesky + Schur
  complement when Q is PD, LDLᵀ of the KKT matrix otherwise.
* ``"sparse"`` — :class:`SparseKKTBackend`: one large problem with sparse Q and A (torch
  sparse or SciPy), sparse LDLᵀ/LU on the CPU; gradients of Q and A on their patterns.
* ``"osqp"`` — :class:`OSQPBackend`: OSQP with ``l = u = b`` as the forward solver.
* ``"auto"`` — sparse if Q or A is sparse, dense otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from implicit_layers.core.checks import check_same_dtype_device, check_tensor
from implicit_layers.layers.eq_qp.dense import DenseKKTBackend
from implicit_layers.layers.eq_qp.osqp import OSQPBackend
from implicit_layers.layers.eq_qp.sparse import SparseKKTBackend, is_sparse
from implicit_layers.stats import LayerStats, SolverStats

BACKENDS = {"dense": DenseKKTBackend, "sparse": SparseKKTBackend, "osqp": OSQPBackend}


def check_eq_qp_inputs(Q: Tensor, c: Tensor, A: Tensor, b: Tensor, finite: bool = True) -> None:
    """Shapes ``Q (*, n, n)``, ``c (*, n)``, ``A (*, m, n)``, ``b (*, m)`` with broadcastable
    batch dims, one floating dtype and device, and (``finite=True``) no NaN/Inf; ValueError
    naming the argument."""
    named = {"Q": Q, "c": c, "A": A, "b": b}
    for (name, t), ndim in zip(named.items(), (2, 1, 2, 1), strict=True):
        check_tensor(name, t, min_ndim=ndim, finite=False)
    check_same_dtype_device(named)
    n, m = Q.shape[-1], A.shape[-2]
    if Q.shape[-2] != n:
        raise ValueError(f"Q must be square (..., n, n), got shape {tuple(Q.shape)}")
    if c.shape[-1] != n:
        raise ValueError(f"c must have shape (..., {n}) to match Q, got {tuple(c.shape)}")
    if A.shape[-1] != n:
        raise ValueError(f"A must have shape (..., m, {n}) to match Q, got {tuple(A.shape)}")
    if b.shape[-1] != m:
        raise ValueError(f"b must have shape (..., {m}) to match A's rows, got {tuple(b.shape)}")
    if m == 0:
        raise ValueError("A must have at least one row (use a linear solve without constraints)")
    batches = (Q.shape[:-2], c.shape[:-1], A.shape[:-2], b.shape[:-1])
    if not batches[0] == batches[1] == batches[2] == batches[3]:
        try:
            torch.broadcast_shapes(*batches)
        except RuntimeError as err:
            raise ValueError(
                f"batch dims do not broadcast: Q {tuple(batches[0])}, c {tuple(batches[1])}, "
                f"A {tuple(batches[2])}, b {tuple(batches[3])}") from err
    if finite:  # after the shapes: a malformed input is reported as such
        for name, t in named.items():
            check_tensor(name, t)


class EqualityQPLayer(nn.Module):
    """Solve ``min ½xᵀQx + cᵀx s.t. Ax = b`` and differentiate through it.

    Args:
        backend: "auto", "dense", "sparse", "osqp", or a backend instance
            (:class:`DenseKKTBackend`, :class:`SparseKKTBackend`, :class:`OSQPBackend`).

    Shapes: ``Q (*, n, n)``, ``c (*, n)``, ``A (*, m, n)``, ``b (*, m)`` with broadcasting
    batch dims (dense and OSQP backends); ``forward`` returns ``x (*, n)`` and ``λ (*, m)``
    with the sign convention ``Qx + c + Aᵀλ = 0``.

    Raises:
        ValueError: malformed input, naming the argument.
        SingularSystemError: A's rows are dependent, or Q is not positive definite on the
            null space of A (the message says which).
        ConvergenceError: the OSQP backend did not converge.

    >>> import torch, implicit_layers as il
    >>> Q = torch.eye(2, dtype=torch.float64)
    >>> c = torch.tensor([1., -1.], dtype=torch.float64, requires_grad=True)
    >>> A, b = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    >>> x, lam = il.EqualityQPLayer()(Q, c, A, b)
    >>> x.detach(), lam.detach()
    (tensor([-0.5000,  1.5000], dtype=torch.float64), tensor([-0.5000], dtype=torch.float64))
    >>> x[0].backward(); c.grad
    tensor([-0.5000,  0.5000], dtype=torch.float64)
    """

    def __init__(self, backend="auto"):
        super().__init__()
        if isinstance(backend, str):
            if backend != "auto" and backend not in BACKENDS:
                raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, "
                                 f"got {backend!r}")
            # instances are kept so that state (OSQP warm starts) survives across calls
            self._instances = {backend: BACKENDS[backend]()} if backend != "auto" else {}
        elif callable(backend):
            self._instances = {"given": backend}
        else:
            raise ValueError(f"backend must be a name or a backend instance, got {backend!r}")
        self.backend = backend
        self.stats = LayerStats()

    def resolve(self, Q, A):
        """The backend instance that solves these inputs."""
        if self.backend != "auto":
            return next(iter(self._instances.values()))
        name = "sparse" if is_sparse(Q) or is_sparse(A) else "dense"
        if name not in self._instances:
            self._instances[name] = BACKENDS[name]()
        return self._instances[name]

    def forward(self, Q, c: Tensor, A, b: Tensor) -> tuple[Tensor, Tensor]:
        backend = self.resolve(Q, A)
        if not getattr(backend, "accepts_sparse", False) or not (is_sparse(Q) or is_sparse(A)):
            check_eq_qp_inputs(Q, c, A, b, finite=not getattr(backend, "checks_finite", False))
        x, lam = backend(Q, c, A, b)
        solve = getattr(backend, "stats", None)  # iterative backends (OSQP) report their own
        if solve is None:  # a direct KKT factorization: one exact step per sample
            solve = SolverStats.exact(type(backend).__name__, x.shape[:-1], device=x.device)
        self.stats = LayerStats(forward=solve)
        return x, lam

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
