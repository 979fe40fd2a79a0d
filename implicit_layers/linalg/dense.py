"""Dense batched factorizations: LU (general) and Cholesky (symmetric positive definite).

Both check for (near) singularity and raise :class:`SingularSystemError` instead of returning
garbage. Batched LU on CPU with several threads is unreliable in some torch/MKL builds
(pytorch#142815: invalid pivots for batches of matrices of size ≳150); :func:`lu_factor`
factors such batches one matrix at a time and validates the pivots it gets back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.checks import all_finite, check_positive
from implicit_layers.errors import SingularSystemError
from implicit_layers.linalg.base import Factorization, LinearOperator, LinearSolver
from implicit_layers.stats import SolverStats

#: matrices at least this large are factored one by one in CPU batches (pytorch#142815)
_UNSAFE_BATCHED_LU_SIZE = 128


def default_rcond(dtype: torch.dtype, n: int) -> float:
    return max(n, 1) * torch.finfo(dtype).eps


def lu_factor(A: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.lu_factor`` made safe for CPU batches with several threads."""
    n = A.shape[-1]
    batched = A.ndim > 2 and A.shape[:-2].numel() > 1
    risky = A.device.type == "cpu" and batched and n >= _UNSAFE_BATCHED_LU_SIZE
    if risky and torch.get_num_threads() > 1:
        flat = A.reshape(-1, n, n)
        parts = [torch.linalg.lu_factor_ex(M)[:2] for M in flat.unbind(0)]
        LU = torch.stack([p[0] for p in parts]).reshape(A.shape)
        piv = torch.stack([p[1] for p in parts]).reshape(*A.shape[:-1])
    else:  # exact zero pivots are reported by check_conditioning, not by torch
        LU, piv, _ = torch.linalg.lu_factor_ex(A)
    if bool(((piv < 1) | (piv > n)).any()):  # the symptom of pytorch#142815
        raise RuntimeError("torch.linalg.lu_factor returned invalid pivots (pytorch#142815)")
    return LU, piv


def check_conditioning(diag: Tensor, rcond: float, what: str) -> None:
    """Raise if ``min |diag| <= rcond * max |diag|`` in any matrix of the batch."""
    mags = diag.abs()
    small = mags.amin(-1) <= rcond * mags.amax(-1).clamp_min(torch.finfo(diag.dtype).tiny)
    if bool(small.any()) or not bool(torch.isfinite(diag).all()):
        bad = int((small | ~torch.isfinite(diag).all(-1)).sum())
        raise SingularSystemError(
            f"{what} is singular or numerically singular in {bad} of {small.numel()} batch "
            f"entries (pivot ratio below {rcond:.1e})"
        )


def check_finite_matrix(A: Tensor, what: str) -> None:
    """Raise if some matrix of the batch has NaN/Inf entries (nothing to factor)."""
    if not all_finite(A):
        bad = int((~torch.isfinite(A)).flatten(-2).any(-1).sum())
        total = A.shape[:-2].numel()
        raise SingularSystemError(
            f"{what} has NaN/Inf entries in {bad} of {total} batch entries (the function is not "
            f"differentiable there, or its derivatives overflow)")


class LUFactorization(Factorization):
    def __init__(self, LU: Tensor, pivots: Tensor):
        self.LU, self.pivots = LU, pivots
        self.stats = SolverStats.exact("LU", LU.shape[:-2], device=LU.device)

    def solve(self, b: Tensor, transpose: bool = False) -> Tensor:
        rhs = b.unsqueeze(-1)
        LU, piv = self.LU, self.pivots
        if rhs.shape[:-2] != LU.shape[:-2]:
            shape = torch.broadcast_shapes(rhs.shape[:-2], LU.shape[:-2])
            LU = LU.expand(*shape, *LU.shape[-2:])
            piv = piv.expand(*shape, piv.shape[-1])
            rhs = rhs.expand(*shape, *rhs.shape[-2:])
        return torch.linalg.lu_solve(LU, piv, rhs, adjoint=transpose).squeeze(-1)


class LU(LinearSolver):
    """Partial-pivoting LU; the transposed solve reuses the same factors.

    >>> import torch
    >>> A = torch.tensor([[2.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    >>> fac = LU().factor(A)
    >>> fac.solve(torch.tensor([3.0, 1.0], dtype=torch.float64)), fac.solve(
    ...     torch.tensor([2.0, 2.0], dtype=torch.float64), transpose=True)
    (tensor([1., 1.], dtype=torch.float64), tensor([1., 1.], dtype=torch.float64))

    Args:
        rcond: pivot-ratio threshold below which the matrix counts as singular
            (default ``n · eps``).
    """

    def __init__(self, rcond: float | None = None):
        self.rcond = check_positive("rcond", rcond, allow_zero=True)

    def factor(self, op: LinearOperator | Tensor, what: str = "the linear system") -> LUFactorization:
        A = op if isinstance(op, Tensor) else op.to_dense()
        check_finite_matrix(A, what)
        LU_, piv = lu_factor(A)
        rcond = self.rcond if self.rcond is not None else default_rcond(A.dtype, A.shape[-1])
        check_conditioning(LU_.diagonal(dim1=-2, dim2=-1), rcond, what)
        return LUFactorization(LU_, piv)


class CholeskyFactorization(Factorization):
    def __init__(self, L: Tensor):
        self.L = L
        self.stats = SolverStats.exact("Cholesky", L.shape[:-2], device=L.device)

    def solve(self, b: Tensor, transpose: bool = False) -> Tensor:  # symmetric: transpose is free
        return torch.cholesky_solve(b.unsqueeze(-1), self.L).squeeze(-1)


class Cholesky(LinearSolver):
    """Cholesky for symmetric positive definite operators; raises when not positive definite.

    >>> import torch
    >>> A = torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
    >>> Cholesky().factor(A).solve(torch.tensor([6.0, 5.0], dtype=torch.float64))
    tensor([1.0000, 1.0000], dtype=torch.float64)"""

    def __init__(self, rcond: float | None = None):
        self.rcond = check_positive("rcond", rcond, allow_zero=True)

    def factor(self, op: LinearOperator | Tensor, what: str = "the linear system") -> CholeskyFactorization:
        A = op if isinstance(op, Tensor) else op.to_dense()
        check_finite_matrix(A, what)
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info > 0).any()):
            raise SingularSystemError(f"{what} is not positive definite (Cholesky failed)")
        rcond = self.rcond if self.rcond is not None else default_rcond(A.dtype, A.shape[-1])
        # cond(A) = cond(L)^2, so compare squared pivots
        check_conditioning(L.diagonal(dim1=-2, dim2=-1) ** 2, rcond, what)
        return CholeskyFactorization(L)
