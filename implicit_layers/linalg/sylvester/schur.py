"""Bartels–Stewart on the real Schur form: the CPU backend for Sylvester-type operators.

**CPU only**: the factors live in NumPy arrays; :meth:`SchurSylvester.factor` copies ``A``
and ``B`` to host memory and :meth:`SchurSylvester.solve` copies ``C`` there and ``X`` back
to ``C``'s device.

With ``A = U S Uᵀ`` and ``B = Z T Zᵀ`` (``U, Z`` orthogonal, ``S, T`` upper quasi-triangular
from LAPACK ``gees``), ``A X + X B = C`` becomes ``S Y + Y T = Uᵀ C Z`` with ``X = U Y Zᵀ``,
one call of LAPACK ``trsyl`` per matrix. Transposes are free: ``Aᵀ = U Sᵀ Uᵀ`` is the same
factor read with ``trans="T"``, so the adjoint equation ``Aᵀ W + W Bᵀ = X̄``, the tangent
equation and the Lyapunov case ``B = Aᵀ`` reuse one Schur decomposition.

The Stein operator ``A X B − X`` is reduced to a Sylvester one by the Cayley transform
``Â = (A + I)⁻¹(A − I)``, ``B̂ = (B + I)⁻¹(B − I)``: with ``X = 4 (A + I)⁻¹ Y (B + I)⁻¹``,
``A X B − X = 2 (Â Y + Y B̂)``. In Schur coordinates ``(S + I)⁻¹`` and ``Ŝ`` keep the
quasi-triangular structure of ``S``, so ``trsyl`` still applies. It needs ``−1 ∉ spec(A),
spec(B)``, which holds whenever the discrete Lyapunov operator (``B = Aᵀ``) is nonsingular.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy.linalg import get_lapack_funcs
from torch import Tensor

from implicit_layers.errors import ConvergenceError, SingularSystemError
from implicit_layers.linalg.sylvester.operator import SylvesterFactorization, check_separation


@lru_cache(maxsize=64)
def _gees_lwork(n: int, typechar: str) -> int:
    (gees,) = get_lapack_funcs(("gees",), dtype=np.dtype(typechar))
    work = gees(lambda x, y: None, np.eye(n, dtype=typechar), lwork=-1)[-2]
    return max(int(work[0].real), 3 * n, 1)


def _real_schur(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``M = U S Uᵀ`` for one matrix; returns ``U, S`` and the eigenvalues (complex)."""
    n = M.shape[-1]
    (gees,) = get_lapack_funcs(("gees",), (M,))
    S, _, wr, wi, U, _, info = gees(
        lambda x, y: None, np.array(M, order="F"), lwork=_gees_lwork(n, M.dtype.char),
        overwrite_a=1,
    )
    if info != 0:
        raise ConvergenceError(f"LAPACK gees (real Schur form) failed with info={info}")
    return U, S, wr + 1j * wi


def _quasi_triangular_mask(S: np.ndarray) -> np.ndarray:
    """True on the upper triangle and on the subdiagonal entries of ``S``'s 2×2 blocks."""
    n = S.shape[-1]
    mask = np.broadcast_to(np.triu(np.ones((n, n), dtype=bool)), S.shape).copy()
    rows = np.arange(1, n)
    mask[..., rows, rows - 1] = S[..., rows, rows - 1] != 0
    return mask


class SchurFactor:
    """A batch of matrices ``M = U op(S) Uᵀ``; ``op`` transposes when ``transposed``.

    For the Stein operator it also holds the Cayley data ``K = (S + I)⁻¹`` and
    ``Ŝ = K (S − I)``, both with ``S``'s quasi-triangular structure.
    """

    def __init__(self, U, S, eigvals, transposed=False, cayley=None):
        self.U, self.S, self.eigvals = U, S, eigvals
        self.transposed, self.cayley = transposed, cayley

    @classmethod
    def compute(cls, M: np.ndarray) -> SchurFactor:
        batch, n = M.shape[:-2], M.shape[-1]
        U, S = np.empty_like(M), np.empty_like(M)
        lam = np.empty(batch + (n,), dtype=np.result_type(M.dtype, np.complex64))
        for idx in np.ndindex(batch):
            U[idx], S[idx], lam[idx] = _real_schur(M[idx])
        return cls(U, S, lam)

    def with_cayley(self) -> SchurFactor:
        n = self.S.shape[-1]
        eye = np.eye(n, dtype=self.S.dtype)
        mask = _quasi_triangular_mask(self.S)
        K = np.where(mask, np.linalg.solve(self.S + eye, np.broadcast_to(eye, self.S.shape)), 0)
        S_hat = np.where(mask, K @ (self.S - eye), 0)
        return SchurFactor(self.U, self.S, self.eigvals, self.transposed, (S_hat, K))

    @property
    def T(self) -> SchurFactor:
        return SchurFactor(self.U, self.S, self.eigvals, not self.transposed, self.cayley)

    def op(self, M: np.ndarray) -> np.ndarray:
        """``op`` applied to one of this factor's quasi-triangular matrices."""
        return np.swapaxes(M, -1, -2) if self.transposed else M

    @property
    def trans(self) -> str:
        return "T" if self.transposed else "N"


class SchurSylvester(SylvesterFactorization):
    """Bartels–Stewart factorization of ``A X + X B`` or ``A X B − X`` (CPU, LAPACK).

    Build it with :meth:`factor`; the adjoint (:attr:`T`) shares the Schur factors.
    """

    backend = "schur"

    def __init__(self, a: SchurFactor, b: SchurFactor, kind: str, device, dtype):
        self.a, self.b, self.kind, self.device, self.dtype = a, b, kind, device, dtype

    @classmethod
    def factor(cls, A: Tensor, B: Tensor, kind: str, b_is_a_transposed: bool = False,
               rcond: float | None = None) -> SchurSylvester:
        a = SchurFactor.compute(A.detach().cpu().numpy())
        b = a.T if b_is_a_transposed else SchurFactor.compute(B.detach().cpu().numpy())
        check_separation(torch.from_numpy(a.eigvals), torch.from_numpy(b.eigvals), kind, rcond)
        if kind == "stein":  # after the check: −1 ∈ spec(A) makes discrete Lyapunov singular
            a = a.with_cayley()
            b = a.T if b_is_a_transposed else b.with_cayley()
        return cls(a, b, kind, A.device, A.dtype)

    @property
    def T(self) -> SchurSylvester:
        fac = SchurSylvester(self.a.T, self.b.T, self.kind, self.device, self.dtype)
        fac.backend = self.backend
        return fac

    @property
    def batch_shapes(self):
        return self.a.S.shape[:-2], self.b.S.shape[:-2]

    def solve(self, C: Tensor) -> Tensor:
        a, b = self.a, self.b
        Ua, Ub = a.U, b.U
        Ct = np.swapaxes(Ua, -1, -2) @ C.detach().cpu().numpy() @ Ub
        if self.kind == "stein":
            (Sa, Ka), (Sb, Kb) = a.cayley, b.cayley
            Y = _trsyl_batched(Sa, Sb, Ct / 2, a.trans, b.trans)
            Y = 4 * (a.op(Ka) @ Y @ b.op(Kb))
        else:
            Y = _trsyl_batched(a.S, b.S, Ct, a.trans, b.trans)
        X = Ua @ Y @ np.swapaxes(Ub, -1, -2)
        return torch.from_numpy(np.ascontiguousarray(X)).to(device=self.device, dtype=self.dtype)


#: quasi-triangular solves at most this large go straight to LAPACK trsyl (unblocked)
TRSYL_BLOCK = 64


def _trsyl_batched(Sa, Sb, C, trans_a: str, trans_b: str) -> np.ndarray:
    """``op(Sa) Y + Y op(Sb) = C`` for broadcast batches of quasi-triangular ``Sa, Sb``.

    LAPACK ``trsyl`` perturbs pivots below its absolute threshold (the smallest normal
    number), a false "singular" for tiny data: each sample is solved as
    ``(Sa/s) Y + Y (Sb/s) = C/s`` with ``s`` the power of two nearest the data's magnitude
    (an exact scaling: ``Y`` is unchanged), once per sample rather than per block."""
    batch = np.broadcast_shapes(Sa.shape[:-2], Sb.shape[:-2], C.shape[:-2])
    Sa = np.broadcast_to(Sa, batch + Sa.shape[-2:])
    Sb = np.broadcast_to(Sb, batch + Sb.shape[-2:])
    C = np.broadcast_to(C, batch + C.shape[-2:])
    Y = np.empty(C.shape, dtype=C.dtype)
    for idx in np.ndindex(batch):
        top = max(np.abs(Sa[idx]).max(initial=0.0), np.abs(Sb[idx]).max(initial=0.0))
        s = float(2.0 ** np.round(np.log2(top))) if 0.0 < top < np.inf else 1.0
        a, b, c = (Sa[idx], Sb[idx], C[idx]) if s == 1.0 else (Sa[idx] / s, Sb[idx] / s, C[idx] / s)
        Y[idx] = _trsyl_recursive(a, b, c, trans_a == "T", trans_b == "T")
    return Y


def _split(S: np.ndarray) -> int:
    """A split point near the middle of quasi-triangular ``S`` that keeps 2×2 blocks whole."""
    k = S.shape[-1] // 2
    return k + 1 if S[k, k - 1] != 0 else k


def _trsyl_recursive(Sa, Sb, C, ta: bool, tb: bool) -> np.ndarray:
    """Recursive blocked Bartels–Stewart (Jonsson & Kågström): the off-diagonal coupling
    becomes matrix products, and LAPACK ``trsyl`` only sees blocks of size ≤ TRSYL_BLOCK.

    With ``op(Sa) = [[A11, A12], [0, A22]]`` (upper; transposed: lower) the block rows
    decouple as ``A22 Y2 + Y2 op(Sb) = C2``, then ``A11 Y1 + Y1 op(Sb) = C1 − A12 Y2``
    (lower: ``Y1`` first, then ``C2 − A12ᵀ Y1``); block columns of ``op(Sb)`` likewise.
    """
    n, m = Sa.shape[-1], Sb.shape[-1]
    if max(n, m) <= TRSYL_BLOCK:
        return _trsyl_base(Sa, Sb, C, ta, tb)
    if n >= m:
        k = _split(Sa)
        A11, A12, A22 = Sa[:k, :k], Sa[:k, k:], Sa[k:, k:]
        if ta:  # op(Sa) lower: first block row first
            Y1 = _trsyl_recursive(A11, Sb, C[:k], ta, tb)
            Y2 = _trsyl_recursive(A22, Sb, C[k:] - A12.T @ Y1, ta, tb)
        else:
            Y2 = _trsyl_recursive(A22, Sb, C[k:], ta, tb)
            Y1 = _trsyl_recursive(A11, Sb, C[:k] - A12 @ Y2, ta, tb)
        return np.concatenate([Y1, Y2], axis=0)
    k = _split(Sb)
    B11, B12, B22 = Sb[:k, :k], Sb[:k, k:], Sb[k:, k:]
    if tb:  # op(Sb) lower: C[:, :k] = op(Sa) Y1 + Y1 B11ᵀ + Y2 B12ᵀ, so Y2 first
        Y2 = _trsyl_recursive(Sa, B22, C[:, k:], ta, tb)
        Y1 = _trsyl_recursive(Sa, B11, C[:, :k] - Y2 @ B12.T, ta, tb)
    else:
        Y1 = _trsyl_recursive(Sa, B11, C[:, :k], ta, tb)
        Y2 = _trsyl_recursive(Sa, B22, C[:, k:] - Y1 @ B12, ta, tb)
    return np.concatenate([Y1, Y2], axis=1)


def _trsyl_base(Sa, Sb, C, ta: bool, tb: bool) -> np.ndarray:
    (trsyl,) = get_lapack_funcs(("trsyl",), (C,))
    y, scale, info = trsyl(Sa, Sb, C, trana="T" if ta else "N", tranb="T" if tb else "N")
    if info < 0:
        raise ValueError(f"LAPACK trsyl rejected argument {-info}")
    if info == 1:
        raise SingularSystemError(
            "LAPACK trsyl: A and -B have (nearly) common eigenvalues; the Sylvester "
            "operator is singular or nearly so"
        )
    return y / scale
