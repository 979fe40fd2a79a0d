"""Sparse equality-QP backend: one large problem, sparse LDLᵀ factored once (CPU, SciPy/qdldl).

Q and A are torch sparse tensors (COO or CSR) or SciPy sparse matrices; c and b are dense
1-D tensors. The KKT matrix ``[[sym(Q), Aᵀ], [A, 0]]`` is factored once by
:class:`~implicit_layers.linalg.sparse.SparseSaddleLDL`; the forward solve, the adjoint
solve of the backward, the tangent solve of the JVP and double backward all reuse it. The
layer's inputs are the stored values of Q and A (1-D tensors), so its generic backward
produces gradients on the patterns: for a stored entry ``(i, j)``,
``Q̄_ij = −½(w_x,i x_j + x_i w_x,j)`` and ``Ā_ij = −(w_λ,i x_j + λ_i w_x,j)``.
Gradients of Q and A live on their sparsity patterns (a torch sparse input receives a sparse
gradient with its own pattern); SciPy inputs are constants.

CPU-only: the data is moved to NumPy for the factorization and the results moved back to
the device and dtype of c.
"""

from __future__ import annotations

from typing import overload

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from implicit_layers.checks import check_same_dtype_device, check_tensor
from implicit_layers.compat import is_wrapped
from implicit_layers.errors import SingularSystemError
from implicit_layers.linalg.base import Factorization
from implicit_layers.linalg.sparse import SparseSaddleLDL
from implicit_layers.solvers.base import RootProblem, SolveResult
from implicit_layers.stats import SolverStats

#: a matrix argument of the equality QP: a dense or sparse Tensor, or a SciPy sparse matrix
Matrix = Tensor | sp.spmatrix | sp.sparray


def is_sparse(M: object) -> bool:
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


class SparseKKTProblem(Factorization):
    """One sparse QP's patterns and KKT factorization: the residual of the layer on the
    stored values, its forward solve, and the factorization the backward reuses."""

    def __init__(self, Q_pat: _Pattern, A_pat: _Pattern, fac: SparseSaddleLDL):
        self.Q, self.A, self.fac = Q_pat, A_pat, fac
        self.stats = None

    def residual(self, inputs, y: Tensor) -> Tensor:
        """``[sym(Q)x + c + Aᵀλ; Ax − b]`` with Q and A given by their stored values."""
        Qv, c, Av, b = inputs
        n = c.shape[-1]
        x, lam = y[:n], y[n:]
        Qx = (self.Q.matvec(Qv, x) + self.Q.matvec(Qv, x, transpose=True)) / 2
        return torch.cat([Qx + c + self.A.matvec(Av, lam, transpose=True),
                          self.A.matvec(Av, x) - b])

    # one object is both the layer's forward solver, solve(problem, y0), and the adjoint's
    # factorization, solve(b, transpose=...): the second positional name differs from the base's
    @overload  # type: ignore[override]
    def solve(self, problem: Tensor, y0: Tensor | bool | None = None,
              transpose: bool = False) -> Tensor: ...
    @overload
    def solve(self, problem: RootProblem, y0: Tensor | None = None,
              transpose: bool = False) -> SolveResult: ...

    def solve(self, problem: Tensor | RootProblem, y0: Tensor | bool | None = None,
              transpose: bool = False) -> Tensor | SolveResult:
        """As the layer's forward solver (``problem`` a RootProblem with ``data = (Qv, c,
        Av, b)``): the solution ``(x; λ)`` of ``K (x; λ) = (−c; b)``. As a factorization of
        the symmetric K (``problem`` a tensor of right-hand sides ``(*extra, n + m)``)."""
        if isinstance(problem, Tensor):
            return self._solve(problem)
        _, c, _, b = problem.data
        y = self._solve(torch.cat([-c, b]))
        return SolveResult(y, SolverStats.exact("sparse-ldl", (), device=y.device), self)

    def _solve(self, r: Tensor) -> Tensor:
        flat = r.reshape(-1, r.shape[-1]).detach().cpu().double().numpy().T
        z = torch.as_tensor(self.fac.solve(flat).T, dtype=r.dtype, device=r.device)
        return z.reshape(r.shape)


class SparseKKTBackend:
    """One large sparse equality QP; sparse LDLᵀ of the KKT matrix reused by the backward.

    CPU-only (SciPy + qdldl): inputs on another device are moved to the CPU for the
    factorization and the results moved back. Not batched; torch.func transforms are not
    supported (sparse tensors do not support them).

    Args:
        delta: relative regularization of the quasi-definite factorization (refined away).
        max_refine: most iterative-refinement steps per solve.

    >>> import torch, scipy.sparse as sp, implicit_layers as il
    >>> Q, A = sp.identity(3, format="csc"), sp.csr_matrix([[1., 1., 1.]])
    >>> c, b = torch.zeros(3, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    >>> x, lam = il.EqualityQPLayer(SparseKKTBackend())(Q, c, A, b)
    >>> x
    tensor([0.3333, 0.3333, 0.3333], dtype=torch.float64)
    """

    name = "sparse"
    accepts_sparse = True
    checks_finite = False

    def __init__(self, delta: float = 1e-9, max_refine: int = 20):
        self.delta, self.max_refine = delta, max_refine

    def prepare(self, Q, c: Tensor, A, b: Tensor):
        """Check the inputs and factor the KKT matrix: ``(Q values, c, A values, b, problem)``
        (the arguments of :meth:`EqualityQPLayer.sparse_values`)."""
        check_tensor("c", c, min_ndim=1)
        check_tensor("b", b, min_ndim=1)
        check_same_dtype_device({"c": c, "b": b})
        if is_wrapped(c):
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
        return Qv, c, Av, b, SparseKKTProblem(Q_pat, A_pat, fac)


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
