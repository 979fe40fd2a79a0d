"""The KKT matrix of an inequality-constrained QP, regularized and factored once per use.

Every linear system of the QP solvers (each interior-point step, the polishing step, the
backward and the JVP) has the symmetric form

    M = [ Q   Aᵀ  Gᵀ ]        Q (n×n) positive semidefinite, A (p×n), G (m×n),
        [ A   0   0  ]        W = diag(w), w ≥ 0 (w = s/z at an interior point; 0 for an
        [ G   0  −W  ]        active and 1 for an inactive constraint in the derivative)

which may be singular (an LP, a singular Q, dependent equality rows, duplicated active
constraints). This module factors the quasi-definite regularization

    M_δ = [ Q + ρI   Aᵀ     Gᵀ       ]
          [ A       −δI     0        ]
          [ G        0     −(W + δI) ]

by eliminating the multipliers, ``λ = (Ax − r₂)/δ`` and ``μ = (Gx − r₃)/(W + δ)``, which
leaves one positive definite system for any data:

    H = Q + ρI + AᵀA/δ + Gᵀ(W + δI)⁻¹G = L Lᵀ,      H x = r₁ + Aᵀr₂/δ + Gᵀ(W + δI)⁻¹r₃.

Callers that need ``M`` itself refine against it (:meth:`PrimalKKTFactor.refined`): each step
contracts the error by about ``max(ρ, δ) ‖M⁻¹‖``. Where ``M`` is singular the refinement stops
improving; the error components in its null space stay those of the regularized solution,
a proximal-point (minimum-norm-like) choice. A Cholesky that fails anyway (round-off) is
reported per sample in ``ok``: one bad problem must not stop a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def mv(M: Tensor, v: Tensor) -> Tensor:
    """``M v`` for ``M (B, r, k)`` and ``v (..., B, k)``, written as the row vector ``vᵀMᵀ``:
    on CPU, batched matrix @ column was several times slower than row @ matrix. Leading
    dims of ``v`` beyond ``M``'s batch become rows of one product: a broadcast batched
    matmul copies ``M`` for each (5× slower at (2, 128, 100) × (128, 120, 100))."""
    if v.ndim > 2 and M.ndim == 3:
        rows = v.reshape(v.shape[:-2].numel(), *v.shape[-2:]).movedim(0, -2)  # (B, E, k)
        return (rows @ M.mT).movedim(-2, 0).reshape(*v.shape[:-1], M.shape[-2])
    return (v.unsqueeze(-2) @ M.mT).squeeze(-2)


def cholesky_lower(H: Tensor) -> tuple[Tensor, Tensor]:
    """``(L, info)`` of ``torch.linalg.cholesky_ex`` for symmetric ``H``, computed as the upper
    factor ``Lᵀ`` of the row-major ``H``: LAPACK sees it column-major, which skips a transposed
    copy (~10% faster on CPU for n ≈ 100). ``L`` is the transposed view."""
    U, info = torch.linalg.cholesky_ex(H, upper=True)
    return U.mT, info


def tri(L: Tensor, B: Tensor, transpose: bool = False) -> Tensor:
    """``L⁻¹ B`` (or ``L⁻ᵀ B``) for lower-triangular ``L (B, n, n)`` and ``B (..., B, n, k)``.
    Leading dims of ``B`` beyond ``L``'s batch become columns of one solve (an expanded
    ``L`` would be copied for each)."""
    extra = B.ndim - L.ndim
    if extra > 0 and L.ndim == 3:
        flat = B.reshape(B.shape[:extra].numel(), *B.shape[extra:])  # (E, B, n, k)
        E, k = flat.shape[0], flat.shape[3]
        cols = flat.permute(1, 2, 3, 0).reshape(*flat.shape[1:3], k * E)  # (B, n, k·E); n = 0 too
        out = tri(L, cols, transpose).reshape(*flat.shape[1:], flat.shape[0])
        return out.permute(3, 0, 1, 2).reshape(B.shape)
    if B.shape[:-2] != L.shape[:-2]:
        L = L.expand(*B.shape[:-2], *L.shape[-2:])
    return torch.linalg.solve_triangular(L.mT if transpose else L, B, upper=transpose)


def tri_vec(L: Tensor, v: Tensor, transpose: bool = False) -> Tensor:
    """:func:`tri` for vectors ``v (..., B, n)``."""
    return tri(L, v.unsqueeze(-1), transpose).squeeze(-1)


def kkt_product(Q: Tensor, A: Tensor, G: Tensor, w: Tensor, z1: Tensor, z2: Tensor, z3: Tensor):
    """``M z`` for ``M`` built from ``(Q, A, G, w)`` (module docstring)."""
    return (mv(Q, z1) + mv(A.mT, z2) + mv(G.mT, z3), mv(A, z1), mv(G, z1) - w * z3)


class PerSampleFactor:
    """What the QP factorizations share: a per-sample ``ok`` flag that zeroes failed samples'
    solutions, and in-place overwriting of some samples (subclasses name the per-sample
    tensors in ``_varying``)."""

    ok: Tensor

    def _masked(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """``tensors`` (``(..., B, k)`` each) with the samples whose factorization failed set to 0."""
        if bool(self.ok.all()):
            return tensors
        keep = self.ok.unsqueeze(-1)
        zero = torch.zeros((), dtype=tensors[0].dtype, device=tensors[0].device)
        return tuple(torch.where(keep, t, zero) for t in tensors)

    def put_(self, idx: Tensor, other: PerSampleFactor, src: Tensor | None = None) -> None:
        """Overwrite samples ``idx`` with ``other``'s factors (its samples ``src``, default all);
        in place. Shared data (the matrices the factors came from) is not copied."""
        for mine, theirs in zip(self._varying(), other._varying(), strict=True):
            mine.index_copy_(0, idx, theirs if src is None else theirs.index_select(0, src))

    def _varying(self) -> tuple[Tensor, ...]:
        raise NotImplementedError


@dataclass
class PrimalKKTFactor(PerSampleFactor):
    """The Cholesky factor of ``H`` for a batch ``(B,)`` of regularized KKT matrices ``M_δ``.

    Attributes:
        L: ``(B, n, n)`` Cholesky factor of ``H``.
        A, G: the constraint matrices; delta: the regularization δ of the multipliers' blocks.
        d: ``(B, m)`` the diagonal of ``(W + δI)⁻¹``.
        ok: ``(B,)`` True where the factorization succeeded (elsewhere solves return 0).
    """

    L: Tensor
    A: Tensor
    G: Tensor
    delta: float
    d: Tensor
    ok: Tensor

    def solve_and_product(self, r1: Tensor | None, r2: Tensor | None, r3: Tensor) -> tuple[Tensor, ...]:
        """``(z₁, z₂, z₃, G z₁)`` with ``M_δ z = r`` (module docstring) for right-hand sides
        ``(..., B, k)``; ``r₁ = r₂ = None`` stand for zeros."""
        g = mv(self.G.mT, self.d * r3)
        if r1 is not None:
            g = g + r1
        p = self.A.shape[-2]
        if r2 is not None and p > 0:
            g = g + mv(self.A.mT, r2) / self.delta
        z1 = tri_vec(self.L, tri_vec(self.L, g), transpose=True)
        Gz1 = mv(self.G, z1)
        z2 = mv(self.A, z1) if p > 0 else z1[..., :0]
        if r2 is not None and p > 0:
            z2 = z2 - r2
        z2 = z2 / self.delta
        z3 = self.d * (Gz1 - r3)
        return self._masked(z1, z2, z3, Gz1)

    def solve(self, r1: Tensor, r2: Tensor, r3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z1, z2, z3, _ = self.solve_and_product(r1, r2, r3)
        return z1, z2, z3

    @classmethod
    def identity(cls, Q: Tensor, A: Tensor, G: Tensor, delta: float) -> PrimalKKTFactor:
        """Placeholder factors (identity, ``ok = False``) to be filled with :meth:`put_`."""
        B, n, m = Q.shape[0], Q.shape[-1], G.shape[-2]
        L = torch.eye(n, dtype=Q.dtype, device=Q.device).repeat(B, 1, 1)
        return cls(L, A, G, delta, Q.new_ones(B, m), torch.zeros(B, dtype=torch.bool, device=Q.device))

    def _varying(self) -> tuple[Tensor, ...]:
        return (self.L, self.d, self.ok)


class PrimalKKT:
    """The ``W``-independent part of ``H``, ``Q + ρI + AᵀA/δ``, for a batch; :meth:`factor`
    adds ``Gᵀ(W + δI)⁻¹G`` and factors.

    Args:
        Q, A, G: ``(B,n,n)``, ``(B,p,n)``, ``(B,m,n)``.
        rho, delta: the primal and the equality block's regularizations (absolute: the data
            is equilibrated).
        delta_ineq: the inequality block's (default ``delta``; 0 where ``w`` is kept
            positive, as in an interior point).
    """

    def __init__(self, Q: Tensor, A: Tensor, G: Tensor, rho: float, delta: float,
                 delta_ineq: float | None = None):
        H0 = Q.clone()
        H0.diagonal(dim1=-2, dim2=-1).add_(rho)
        if A.shape[-2] > 0:
            H0 = torch.baddbmm(H0, A.mT, A, alpha=1 / delta)
        self.H0, self.A, self.G, self.rho, self.delta = H0, A, G, rho, delta
        self.delta_ineq = delta if delta_ineq is None else delta_ineq

    def select(self, idx: Tensor) -> PrimalKKT:
        out = PrimalKKT.__new__(PrimalKKT)
        out.H0, out.A, out.G = (t.index_select(0, idx) for t in (self.H0, self.A, self.G))
        out.rho, out.delta, out.delta_ineq = self.rho, self.delta, self.delta_ineq
        return out

    def factor(self, w: Tensor, G: Tensor | None = None, retries: int = 2) -> PrimalKKTFactor:
        """Factor ``M_δ`` for the diagonal ``w ≥ 0`` (``(B, m)``); ``G`` replaces the stored
        constraint rows (e.g. masked to the active set).

        Dynamic regularization: a sample whose Cholesky fails (``H`` is positive definite in
        exact arithmetic, but a singular ``Q`` leaves ``ρ`` against entries up to ``1/δ``) is
        factored again with ``ρ`` raised 10⁴-fold, up to ``retries`` times; the refinement
        against the exact matrix makes up for it."""
        G = self.G if G is None else G
        d = (w + self.delta_ineq).reciprocal()
        H = torch.baddbmm(self.H0, G.mT, G * d.unsqueeze(-1))
        L, info = cholesky_lower(H)
        ok = (info == 0) & torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all(-1)
        boost = self.rho
        for _ in range(retries):
            if bool(ok.all()):
                break
            boost *= 1e4
            retry = H + boost * (~ok).to(H.dtype)[:, None, None] * torch.eye(
                H.shape[-1], dtype=H.dtype, device=H.device)
            L2, info2 = cholesky_lower(retry)
            fixed = ~ok & (info2 == 0) & torch.isfinite(L2.diagonal(dim1=-2, dim2=-1)).all(-1)
            L = torch.where(fixed[:, None, None], L2, L)
            ok = ok | fixed
        return PrimalKKTFactor(L, self.A, G, self.delta, d, ok)
