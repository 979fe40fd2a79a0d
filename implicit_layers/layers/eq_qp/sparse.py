"""Sparse equality-QP backend: one large problem, sparse LDLᵀ factored once (CPU, SciPy/qdldl).

Q and A are torch sparse tensors (COO or CSR) or SciPy sparse matrices; c and b are dense
1-D tensors. The KKT matrix ``[[sym(Q), Aᵀ], [A, 0]]`` is factored once by
:class:`~implicit_layers.linalg.sparse.SparseSaddleLDL`; the forward solve, the adjoint
solve of the backward, the tangent solve of the JVP and double backward all reuse it.
Gradients of Q and A live on their sparsity patterns (a torch sparse input receives a sparse
gradient with its own pattern); SciPy inputs are constants.

CPU-only: the data is moved to NumPy for the factorization and the results moved back to
the device and dtype of c.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from torch.autograd import Function

from implicit_layers.core.checks import check_same_dtype_device, check_tensor
from implicit_layers.errors import SingularSystemError
from implicit_layers.linalg.kkt.equality import tangent_rhs
from implicit_layers.linalg.sparse import SparseSaddleLDL


def is_sparse(M) -> bool:
    return sp.issparse(M) or (isinstance(M, Tensor) and M.layout != torch.strided)


class _Pattern:
    """Row/column indices of a sparse matrix's stored entries (torch long, NumPy copies)."""

    def __init__(self, rows: Tensor, cols: Tensor, shape: tuple[int, int]):
        self.rows, self.cols, self.shape = rows, cols, shape
        self.np_rows, self.np_cols = rows.cpu().numpy(), cols.cpu().numpy()

    def scipy(self, values: Tensor) -> sp.csc_matrix:
        v = values.detach().cpu().double().numpy()
        return sp.csc_matrix((v, (self.np_rows, self.np_cols)), shape=self.shape)

    def matvec(self, values: Tensor, v: Tensor, transpose: bool = False) -> Tensor:
        """``M v`` (or ``Mᵀ v``) for the matrix with these entries; differentiable."""
        src, dst = (self.rows, self.cols) if transpose else (self.cols, self.rows)
        n_out = self.shape[1] if transpose else self.shape[0]
        return v.new_zeros(n_out).index_add(0, dst, values * v[src])


def _values_and_pattern(name: str, M, dtype, device) -> tuple[Tensor, _Pattern]:
    if sp.issparse(M):
        coo = sp.coo_matrix(M)
        coo.sum_duplicates()
        rows, cols = (torch.as_tensor(a.astype(np.int64), device=device)
                      for a in (coo.row, coo.col))
        values = torch.as_tensor(coo.data, dtype=dtype, device=device)
    elif isinstance(M, Tensor) and M.layout != torch.strided:
        check_tensor(name, M, min_ndim=2, finite=False)
        if M.ndim != 2:
            raise ValueError(f"{name} must be a 2-D sparse matrix (the sparse backend solves "
                             f"one problem), got shape {tuple(M.shape)}")
        coo = (M.to_sparse_coo() if M.layout != torch.sparse_coo else M).coalesce()
        (rows, cols), values = coo.indices(), coo.values()
        if values.dtype != dtype or values.device != torch.device(device):
            raise ValueError(f"{name} has dtype {values.dtype} on {values.device}, but c has "
                             f"{dtype} on {device}")
    else:
        raise ValueError(f"{name} must be a torch sparse tensor or a SciPy sparse matrix for "
                         f"the sparse backend (its gradient lives on its pattern), got "
                         f"{type(M).__name__}{'' if not isinstance(M, Tensor) else ' (dense)'}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return values, _Pattern(rows, cols, tuple(M.shape))


class _SparseProblem:
    """The non-tensor part of a sparse QP: patterns and the KKT factorization."""

    def __init__(self, Q_pat: _Pattern, A_pat: _Pattern, fac: SparseSaddleLDL):
        self.Q, self.A, self.fac = Q_pat, A_pat, fac

    def solve(self, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        r = torch.cat([p, q]).detach().cpu().double().numpy()
        z = torch.as_tensor(self.fac.solve(r), dtype=p.dtype, device=p.device)
        n = p.shape[-1]
        return z[:n], z[n:]

    def sym_matvec(self, Qv: Tensor, v: Tensor) -> Tensor:
        return (self.Q.matvec(Qv, v) + self.Q.matvec(Qv, v, transpose=True)) / 2


class _SparseKKTSolve(Function):
    """``(Q values, A values, p, q, problem) -> (x, λ)`` with ``K (x; λ) = (p; q)``."""

    @staticmethod
    def forward(Qv, Av, p, q, prob):
        return prob.solve(p, q)

    @staticmethod
    def setup_context(ctx, inputs, output):
        Qv, Av, p, q, prob = inputs
        ctx.prob = prob
        ctx.save_for_backward(Qv, Av, *output)
        ctx.save_for_forward(Qv, Av, *output)

    # Pullback (as for the dense backend, restricted to the stored entries): with
    # w = K⁻¹(x̄; λ̄) from the same factorization, p̄ = w_x, q̄ = w_λ and, for a stored entry
    # (i, j),  Q̄_ij = −½(w_x,i x_j + x_i w_x,j)  and  Ā_ij = −(w_λ,i x_j + λ_i w_x,j).
    @staticmethod
    def backward(ctx, x_bar, lam_bar):
        Qv, Av, x, lam = ctx.saved_tensors
        prob = ctx.prob
        w_x, w_l = _SparseKKTSolve.apply(Qv, Av, x_bar, lam_bar, prob)
        Qi, Qj, Ai, Aj = prob.Q.rows, prob.Q.cols, prob.A.rows, prob.A.cols
        Q_bar = -(w_x[Qi] * x[Qj] + x[Qi] * w_x[Qj]) / 2
        A_bar = -(w_l[Ai] * x[Aj] + lam[Ai] * w_x[Aj])
        return Q_bar, A_bar, w_x, w_l, None

    # Pushforward: ż = K⁻¹(ṗ − sym(Q̇)x − Ȧᵀλ; q̇ − Ȧx), Q̇ and Ȧ on the patterns.
    @staticmethod
    def jvp(ctx, Qv_dot, Av_dot, p_dot, q_dot, _prob):
        Qv, Av, x, lam = ctx.saved_tensors
        prob = ctx.prob
        rx, rq = tangent_rhs(x, lam, p_dot, q_dot, Qv_dot, Av_dot,
                             sym_matvec=prob.sym_matvec, matvec=prob.A.matvec)
        return prob.solve(rx, rq)


class SparseKKTBackend:
    """One large sparse equality QP; sparse LDLᵀ of the KKT matrix reused by the backward.

    CPU-only (SciPy + qdldl): inputs on another device are moved to the CPU for the
    factorization and the results moved back. Not batched; torch.func transforms are not
    supported (sparse tensors do not support them).

    Args:
        delta: relative regularization of the quasi-definite factorization (refined away).
        max_refine: most iterative-refinement steps per solve.

    >>> import torch, scipy.sparse as sp
    >>> Q, A = sp.identity(3, format="csc"), sp.csr_matrix([[1., 1., 1.]])
    >>> c, b = torch.zeros(3, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    >>> x, lam = SparseKKTBackend()(Q, c, A, b)
    >>> x
    tensor([0.3333, 0.3333, 0.3333], dtype=torch.float64)
    """

    name = "sparse"
    accepts_sparse = True

    def __init__(self, delta: float = 1e-9, max_refine: int = 20):
        self.delta, self.max_refine = delta, max_refine

    def __call__(self, Q, c: Tensor, A, b: Tensor) -> tuple[Tensor, Tensor]:
        Qv, Av, problem = self.prepare(Q, c, A, b)
        return self.solve(Qv, c, Av, b, problem)

    @staticmethod
    def solve(Qv: Tensor, c: Tensor, Av: Tensor, b: Tensor, problem) -> tuple[Tensor, Tensor]:
        """The differentiable solve on the stored values of Q and A (forward mode through
        the values works here; torch's sparse constructors lack forward-mode support)."""
        return _SparseKKTSolve.apply(Qv, Av, -c, b, problem)

    def prepare(self, Q, c: Tensor, A, b: Tensor):
        """Check the inputs and factor the KKT matrix: ``(Q values, A values, problem)``."""
        check_tensor("c", c, min_ndim=1)
        check_tensor("b", b, min_ndim=1)
        check_same_dtype_device({"c": c, "b": b})
        if torch._C._functorch.is_functorch_wrapped_tensor(c):
            raise NotImplementedError("the sparse backend does not support torch.func "
                                      "transforms; use backend='dense'")
        if c.ndim != 1 or b.ndim != 1:
            raise ValueError(f"the sparse backend solves one problem: c and b must be 1-D, "
                             f"got c {tuple(c.shape)} and b {tuple(b.shape)}")
        Qv, Q_pat = _values_and_pattern("Q", Q, c.dtype, c.device)
        Av, A_pat = _values_and_pattern("A", A, c.dtype, c.device)
        n, m = c.shape[0], b.shape[0]
        if Q_pat.shape != (n, n):
            raise ValueError(f"Q must have shape ({n}, {n}) to match c, got {Q_pat.shape}")
        if A_pat.shape != (m, n):
            raise ValueError(f"A must have shape ({m}, {n}) to match b and c, got {A_pat.shape}")
        Qs, As = Q_pat.scipy(Qv), A_pat.scipy(Av)
        K = sp.bmat([[(Qs + Qs.T) / 2, As.T], [As, None]], format="csc")
        fac = _factor_or_diagnose(K, As, n, self.delta, self.max_refine)
        return Qv, Av, _SparseProblem(Q_pat, A_pat, fac)


def _factor_or_diagnose(K, A, n: int, delta: float, max_refine: int) -> SparseSaddleLDL:
    try:
        fac = SparseSaddleLDL(K, n, delta, max_refine)
        fac.solve(np.random.default_rng(0).standard_normal(K.shape[0]))  # probes singularity
    except SingularSystemError as err:
        raise SingularSystemError(_diagnose(A, delta, max_refine) + f" ({err})") from err
    if fac.inertia[0] != n:
        raise SingularSystemError(
            f"the KKT matrix has the wrong inertia {fac.inertia} (expected ({n}, "
            f"{K.shape[0] - n})): Q is not positive definite on the null space of A")
    return fac


def _diagnose(A, delta: float, max_refine: int) -> str:
    """Error path only: A has dependent rows iff ``[[I, Aᵀ], [A, 0]]`` is singular."""
    m, n = A.shape
    K_I = sp.bmat([[sp.identity(n), A.T], [A, None]], format="csc")
    try:
        SparseSaddleLDL(K_I, n, delta, max_refine).solve(np.ones(n + m))
    except SingularSystemError:
        return "the KKT matrix is singular: A's rows are linearly dependent (A is rank-deficient)"
    return "the KKT matrix is singular: Q is not positive definite on the null space of A"
