"""The KKT matrix of an inequality-constrained QP, factored once and solved many times.

Every linear system of the QP layer (each interior-point step, the backward and the JVP)
has the symmetric quasi-definite form

    M = [ Q   Aᵀ  Gᵀ ]        Q (n×n) positive semidefinite, A (p×n), G (m×n),
        [ A   0   0  ]        W = diag(w), w > 0 (w = s/μ at an interior point)
        [ G   0  −W  ]

Eliminating the third block, ``z₃ = W⁻¹(G z₁ − r₃)``, and then the second through its Schur
complement leaves two batched Cholesky factorizations:

    H = Q + Gᵀ W⁻¹ G + δ I = L Lᵀ,        S = A H⁻¹ Aᵀ + δ I = VᵀV + δ I,    V = L⁻¹Aᵀ

(``δ`` is a small regularization that makes ``H`` positive definite for linear programs and
positive semidefinite ``Q``; callers that need the exact ``M`` refine the solution, see
:func:`refine`). Unlike :class:`~implicit_layers.linalg.Cholesky`, a failure is reported per
sample in ``ok`` rather than raised: one bad problem must not stop a batch of QPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _mv(M: Tensor, v: Tensor) -> Tensor:
    """``M v`` for ``M (B, m, n)`` and ``v (..., B, n)``. Written as the row vector ``vᵀMᵀ``:
    on CPU, batched matrix @ column is several times slower than row @ matrix."""
    return (v.unsqueeze(-2) @ M.mT).squeeze(-2)


def cholesky_lower(H: Tensor) -> tuple[Tensor, Tensor]:
    """``(L, info)`` of ``torch.linalg.cholesky_ex`` for symmetric ``H``, computed as the upper
    factor ``Lᵀ`` of the row-major ``H``: LAPACK sees it column-major, which skips a transposed
    copy (~10% faster on CPU for n ≈ 100). ``L`` is the transposed view."""
    U, info = torch.linalg.cholesky_ex(H, upper=True)
    return U.mT, info


def _tri(L: Tensor, B: Tensor, transpose: bool = False) -> Tensor:
    """``L⁻¹ B`` (or ``L⁻ᵀ B``) for lower-triangular ``L (B, n, n)`` and ``B (..., B, n, k)``."""
    if B.shape[:-2] != L.shape[:-2]:
        L = L.expand(*B.shape[:-2], *L.shape[-2:])
    return torch.linalg.solve_triangular(L.mT if transpose else L, B, upper=transpose)


class PerSampleFactor:
    """What the QP factorizations share: a per-sample ``ok`` flag that zeroes failed samples'
    solutions, and in-place overwriting of some samples (subclasses name the per-sample
    tensors in ``_varying``)."""

    ok: Tensor

    def _masked(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """``tensors`` (``(B, k)`` each) with the samples whose factorization failed set to 0."""
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
class QPKKTFactor(PerSampleFactor):
    """Cholesky factors of ``H`` and ``S`` for a batch ``(B,)`` of KKT matrices ``M``.

    Attributes:
        L: ``(B, n, n)`` Cholesky factor of ``H``; LS: ``(B, p, p)`` Cholesky factor of ``S``.
        V: ``(B, n, p)`` ``L⁻¹Aᵀ``; A, G: the constraint matrices; Winv: ``(B, m)``.
        ok: ``(B,)`` True where both factorizations succeeded (elsewhere solves return 0).
    """

    L: Tensor
    LS: Tensor
    V: Tensor
    A: Tensor
    G: Tensor
    Winv: Tensor
    ok: Tensor

    def solve(self, r1: Tensor, r2: Tensor, r3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Solve ``M z = r`` for right-hand sides of shape ``(..., B, k)`` (extra dims broadcast).

        With ``g = r₁ + GᵀW⁻¹r₃`` and ``y = L⁻¹g``: ``z₂ = S⁻¹(Vᵀy − r₂)``,
        ``z₁ = L⁻ᵀ(y − V z₂)``, ``z₃ = W⁻¹(G z₁ − r₃)``: two triangular solves with ``L``.
        """
        return self.solve_and_product(r1, r2, r3)[:3]

    def solve_and_product(self, r1: Tensor | None, r2: Tensor | None, r3: Tensor) -> tuple[Tensor, ...]:
        """:meth:`solve`'s ``(z₁, z₂, z₃)`` and the product ``G z₁`` it computes on the way;
        ``r₁ = r₂ = None`` stand for zeros."""
        g = _mv(self.G.mT, self.Winv * r3)
        if r1 is not None:
            g = g + r1
        y = _tri(self.L, g.unsqueeze(-1)).squeeze(-1)
        if self.A.shape[-2] > 0:
            Vy = _mv(self.V.mT, y)
            t = _tri(self.LS, (Vy if r2 is None else Vy - r2).unsqueeze(-1))
            z2 = _tri(self.LS, t, transpose=True).squeeze(-1)
            y = y - _mv(self.V, z2)
        else:
            z2 = y[..., :0]
        z1 = _tri(self.L, y.unsqueeze(-1), transpose=True).squeeze(-1)
        Gz1 = _mv(self.G, z1)
        z3 = self.Winv * (Gz1 - r3)
        return self._masked(z1, z2, z3, Gz1)

    @classmethod
    def identity(cls, Q: Tensor, A: Tensor, G: Tensor) -> QPKKTFactor:
        """Placeholder factors (identity, ``ok = False``) to be filled with :meth:`put_`."""
        B, n, p, m = Q.shape[0], Q.shape[-1], A.shape[-2], G.shape[-2]
        eye = lambda k: torch.eye(k, dtype=Q.dtype, device=Q.device).repeat(B, 1, 1)  # noqa: E731
        return cls(eye(n), eye(p), Q.new_zeros(B, n, p), A, G, Q.new_ones(B, m),
                   torch.zeros(B, dtype=torch.bool, device=Q.device))

    def select(self, idx: Tensor) -> QPKKTFactor:
        return QPKKTFactor(*(t.index_select(0, idx) for t in self._fields()))

    def repeat(self, k: int) -> QPKKTFactor:
        """The same factors for a batch repeated ``k`` times: ``(k·B, ...)``."""
        return QPKKTFactor(*(t.repeat(k, *([1] * (t.ndim - 1))) for t in self._fields()))

    def _fields(self) -> tuple[Tensor, ...]:
        return (self.L, self.LS, self.V, self.A, self.G, self.Winv, self.ok)

    def _varying(self) -> tuple[Tensor, ...]:
        return (self.L, self.LS, self.V, self.Winv, self.ok)


def factor_qp_kkt(Q: Tensor, A: Tensor, G: Tensor, Winv: Tensor, reg: float) -> QPKKTFactor:
    """Factor ``M`` for ``Q (B,n,n)``, ``A (B,p,n)``, ``G (B,m,n)`` and ``W⁻¹ (B,m)``."""
    n, p = Q.shape[-1], A.shape[-2]
    H = torch.baddbmm(Q, G.mT, G * Winv.unsqueeze(-1))  # one pass: no temporaries of size n²
    H.diagonal(dim1=-2, dim2=-1).add_(reg)
    # failed samples keep whatever cholesky_ex left in L: every solve masks them with ``ok``
    L, info = cholesky_lower(H)
    ok = (info == 0) & torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all(-1)
    if p > 0:
        V = _tri(L, A.mT)
        S = V.mT @ V
        S.diagonal(dim1=-2, dim2=-1).add_(reg)
        LS, info_s = cholesky_lower(S)
        ok = ok & (info_s == 0) & torch.isfinite(LS.diagonal(dim1=-2, dim2=-1)).all(-1)
    else:
        V = Q.new_zeros(Q.shape[0], n, 0)
        LS = Q.new_zeros(Q.shape[0], 0, 0)
    return QPKKTFactor(L, LS, V, A, G, Winv, ok)


def kkt_matvec(Q: Tensor, A: Tensor, G: Tensor, w: Tensor, z1: Tensor, z2: Tensor, z3: Tensor):
    """``M z`` with ``M`` built from ``(Q, A, G, w)``; differentiable in every argument."""
    return (_mv(Q, z1) + _mv(A.mT, z2) + _mv(G.mT, z3), _mv(A, z1), _mv(G, z1) - w * z3)


def refine(fac, Q, A, G, w, r: tuple[Tensor, ...], steps: int = 1) -> tuple[Tensor, ...]:
    """Solve ``M z = r`` with ``fac`` plus ``steps`` rounds of iterative refinement against the
    exact ``M`` (removes the regularization ``δ`` and most round-off of large ``W⁻¹``)."""
    z = fac.solve(*r)
    for _ in range(steps):
        Mz = kkt_matvec(Q, A, G, w, *z)
        dz = fac.solve(*(ri - mi for ri, mi in zip(r, Mz, strict=True)))
        z = tuple(zi + di for zi, di in zip(z, dz, strict=True))
    return z
