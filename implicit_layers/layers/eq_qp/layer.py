"""EqualityQPLayer: a differentiable equality-constrained quadratic program.

    x*(Q, c, A, b) = argmin_x ½ xᵀQx + cᵀx   s.t.  Ax = b
    KKT:  Qx + c + Aᵀλ = 0,  Ax = b         →  outputs (x, λ)

An :class:`~implicit_layers.ImplicitLayer` with ``y = (x; λ)`` and the residual

    f(θ, y) = [ sym(Q) x + c + Aᵀλ ;  A x − b ],      ∂f/∂y = K = [[sym(Q), Aᵀ], [A, 0]].

Gradients flow from x and λ to all four inputs through the implicit function theorem; every
backend (the layer's forward solver) factors K once and leaves the factorization in
``SolveResult.aux``, which the backward, the JVP and higher derivatives reuse.

Pullback (a closed form replaces the generic VJP of f, for speed). With ``w = (w_x; w_λ) =
K⁻ᵀ (x̄; λ̄)`` and θ̄ = −(∂f/∂θ)ᵀ w:

    ⟨w, ḟ⟩ = ⟨w_x, sym(Q̇)x + ċ + Ȧᵀλ⟩ + ⟨w_λ, Ȧx − ḃ⟩
    ⇒  Q̄ = −½(w_x xᵀ + x w_xᵀ),  c̄ = −w_x,  Ā = −(w_λ xᵀ + λ w_xᵀ),  b̄ = w_λ,

each summed over the batch dims its input was broadcast along. Q is read as its symmetric part ``(Q + Qᵀ)/2``
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
from torch import Tensor

from implicit_layers.checks import check_same_dtype_device, check_tensor
from implicit_layers.core.adjoint import FactorizationAdjoint
from implicit_layers.core.broadcast import outer_sum, sum_to
from implicit_layers.core.layer import ImplicitLayer
from implicit_layers.errors import SingularSystemError
from implicit_layers.layers.eq_qp.dense import DenseKKTBackend
from implicit_layers.layers.eq_qp.osqp import OSQPBackend
from implicit_layers.layers.eq_qp.sparse import Matrix, SparseKKTBackend, is_sparse
from implicit_layers.linalg.kkt.equality import dense_matvec, sym_matvec

BACKENDS = {"dense": DenseKKTBackend, "sparse": SparseKKTBackend, "osqp": OSQPBackend}
#: a backend name ("auto", "dense", "sparse", "osqp") or instance
EqualityQPBackend = str | DenseKKTBackend | SparseKKTBackend | OSQPBackend
#: non-batch dims of (Q, c, A, b)
EVENT_NDIMS = (2, 1, 2, 1)


def kkt_residual(inputs, y: Tensor) -> Tensor:
    """``[sym(Q)x + c + Aᵀλ; Ax − b]`` for ``y = (x; λ)`` (batch dims broadcast)."""
    Q, c, A, b = inputs
    n = Q.shape[-1]
    x, lam = y[..., :n], y[..., n:]
    return torch.cat([sym_matvec(Q, x) + c + dense_matvec(A, lam, True),
                      dense_matvec(A, x) - b], -1)


def kkt_pullback(z, w: Tensor, wanted) -> dict[int, Tensor]:
    """``{i: θ̄_i}`` for θ = (Q, c, A, b) by the closed form of the module docstring."""
    Q, c, A, b, y = z
    n = Q.shape[-1]
    x, lam, w_x, w_l = y[..., :n], y[..., n:], w[..., :n], w[..., n:]
    out = {}
    if 0 in wanted or 2 in wanted:
        right = torch.stack(torch.broadcast_tensors(x, w_x), -1)
    if 0 in wanted:
        left = torch.stack(torch.broadcast_tensors(w_x, x), -1) * -0.5
        out[0] = outer_sum(left, right, Q.shape)
    if 2 in wanted:
        out[2] = outer_sum(torch.stack(torch.broadcast_tensors(w_l, lam), -1).neg(), right, A.shape)
    if 1 in wanted:
        out[1] = sum_to(-w_x, c.shape)
    if 3 in wanted:
        out[3] = sum_to(w_l, b.shape)
    return out


def check_eq_qp_inputs(Q: Tensor, c: Tensor, A: Tensor, b: Tensor, finite: bool = True) -> None:
    """Shapes ``Q (*, n, n)``, ``c (*, n)``, ``A (*, m, n)``, ``b (*, m)`` with broadcastable
    batch dims, one floating dtype and device, and (``finite=True``) no NaN/Inf; ValueError
    naming the argument."""
    named = {"Q": Q, "c": c, "A": A, "b": b}
    for (name, t), ndim in zip(named.items(), EVENT_NDIMS, strict=True):
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


class EqualityQPLayer(ImplicitLayer):
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

    def __init__(self, backend: EqualityQPBackend = "auto"):
        if isinstance(backend, str):
            if backend != "auto" and backend not in BACKENDS:
                raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, "
                                 f"got {backend!r}")
            # instances are kept so that state (OSQP warm starts) survives across calls
            instances = {backend: BACKENDS[backend]()} if backend != "auto" else {}
        elif isinstance(backend, tuple(BACKENDS.values())):
            instances = {"given": backend}
        else:
            raise ValueError(f"backend must be a name or a backend instance, got {backend!r}")
        super().__init__(kkt_residual, None, FactorizationAdjoint())
        self.backend, self._instances = backend, instances

    def resolve(self, Q, A):
        """The backend instance that solves these inputs."""
        if self.backend != "auto":
            return next(iter(self._instances.values()))
        name = "sparse" if is_sparse(Q) or is_sparse(A) else "dense"
        if name not in self._instances:
            self._instances[name] = BACKENDS[name]()
        return self._instances[name]

    def forward(self, Q: Matrix, c: Tensor, A: Matrix, b: Tensor) -> tuple[Tensor, Tensor]:
        backend = self.resolve(Q, A)
        self.on_failure = getattr(backend, "on_failure", "raise")
        if backend.accepts_sparse and (is_sparse(Q) or is_sparse(A)):
            return self.sparse_values(*backend.prepare(Q, c, A, b))
        else:
            check_eq_qp_inputs(Q, c, A, b, finite=False)
            if A.shape[-2] > A.shape[-1]:  # structurally, whatever the values (also n = 0)
                raise SingularSystemError(
                    f"the KKT matrix is singular: A's rows are linearly dependent (A has "
                    f"{A.shape[-2]} rows for {A.shape[-1]} unknowns)")
            batch = torch.broadcast_shapes(Q.shape[:-2], c.shape[:-1], A.shape[:-2], b.shape[:-1])
            y0 = c.new_zeros(*batch, c.shape[-1] + b.shape[-1])
            y = self._solve((Q, c, A, b), y0, solver=backend, x_names=("Q", "c", "A", "b"),
                            broadcasts=True, x_event_ndims=EVENT_NDIMS, sample_check=False,
                            input_pullback=kkt_pullback, check_inputs=not backend.checks_finite)
        n = c.shape[-1]
        return y[..., :n], y[..., n:]

    def sparse_values(self, Qv: Tensor, c: Tensor, Av: Tensor, b: Tensor,
                      problem) -> tuple[Tensor, Tensor]:
        """The differentiable solve of a sparse QP on the stored values of Q and A, with the
        patterns and factorization of ``SparseKKTBackend.prepare`` (which returns
        ``(Qv, c, Av, b, problem)``). Forward mode works here, through the values; torch's
        sparse constructors lack it."""
        y0 = c.new_zeros(c.shape[-1] + b.shape[-1])
        y = self._solve((Qv, c, Av, b), y0, residual=problem.residual, solver=problem,
                        x_names=("Q", "c", "A", "b"), sample_check=False)
        n = c.shape[-1]
        return y[:n], y[n:]

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
