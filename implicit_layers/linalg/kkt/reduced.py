"""The QP KKT matrix reduced to the inequality multipliers, for positive definite ``Q``.

Same matrix as :mod:`implicit_layers.linalg.kkt.inequality`,

    M = [ Q   Aᵀ  Gᵀ ]
        [ A   0   0  ]        W = diag(w), w > 0,
        [ G   0  −W  ]

but eliminated in the other order: ``x`` through ``Q = L Lᵀ``, then ``λ`` through
``A Q⁻¹ Aᵀ = R Rᵀ``. With ``U_A = L⁻¹Aᵀ``, ``U_G = L⁻¹Gᵀ`` and ``T = R⁻¹ U_Aᵀ U_G`` what is
left for ``z₃`` is

    K = P + W + δ I,      P = G Z Gᵀ = U_Gᵀ U_G − Tᵀ T,      Z = Q⁻¹ − Q⁻¹Aᵀ(AQ⁻¹Aᵀ)⁻¹AQ⁻¹.

``P`` does not depend on ``W``: an interior point computes it once per problem and then pays
one ``m × m`` Cholesky factorization per iteration, where the other order forms
``Q + GᵀW⁻¹G`` (``2n²m`` flops) and factors ``n × n`` and ``p × p`` matrices every time.
Solving ``M z = r`` in the whitened coordinates ``z̃₁ = Lᵀz₁``, ``r̃₁ = L⁻¹r₁`` (the rows of
``U = [A; G] L⁻ᵀ`` are ``[U_Aᵀ; U_Gᵀ]``, and the first block row becomes ``z̃₁ + Uᵀ[z₂; z₃] = r̃₁``):

    z₃ = K⁻¹ (U_Gᵀr̃₁ − Tᵀu − r₃),   u = R⁻¹(U_Aᵀr̃₁ − r₂)
    z₂ = R⁻ᵀ (u − T z₃),            z̃₁ = r̃₁ − U_A z₂ − U_G z₃,

and ``G z₁ = U_Gᵀ z̃₁ = r₃ + (w + δ)∘z₃`` (row 3, exact for the regularized ``K``) comes free.
(Row 2, ``U_Aᵀz̃₁ = r₂``, holds by construction of ``z₂``; row 3 by that of ``K``.) Going back,
``z₁ = L⁻ᵀz̃₁``, needs ``Q`` well conditioned: :func:`reduce_qp_kkt` returns ``None`` when it
is not, or when ``A``'s rows are (nearly) dependent, and the caller uses the other order.
Failed samples are flagged in ``ok``, as there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from implicit_layers.linalg.kkt.inequality import PerSampleFactor, cholesky_lower, mv, tri

# largest estimated condition number of Q (or A Q⁻¹ Aᵀ) to eliminate through: the reduced
# order's errors grow with it (x = L⁻ᵀx̃), the other order's much less near the solution
MAX_COND = {torch.float64: 1e6, torch.float32: 1e2}


def _well_conditioned(L: Tensor, info: Tensor, steps: int = 3) -> bool:
    """Whether every ``M = LLᵀ`` factored (``info == 0``) and has ``cond(M) ≤ MAX_COND``,
    estimated as ``‖L‖_F² · ‖M⁻¹‖`` with ``steps`` rounds of inverse iteration (two
    triangular solves each, from a fixed pseudo-random start): a lower bound of ``‖M⁻¹‖`` that
    is usually within a small factor of it."""
    n = L.shape[-1]
    if n == 0:
        return True
    if not bool((info == 0).all()):
        return False
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(n, dtype=L.dtype, generator=gen).to(L.device).expand(*L.shape[:-1]).clone()
    inv_norm = None
    for _ in range(steps):
        v = tri(L, tri(L, v.unsqueeze(-1)), transpose=True).squeeze(-1)
        inv_norm = v.norm(dim=-1, keepdim=True)
        v = v / inv_norm
    assert inv_norm is not None, "steps must be >= 1"
    cond = L.square().sum((-2, -1)) * inv_norm.squeeze(-1)
    return bool((torch.isfinite(cond) & (cond <= MAX_COND[L.dtype])).all())


@dataclass
class ReducedQPKKT:
    """The ``W``-independent part of the reduced system for a batch ``(B,)``: ``L (B,n,n)``,
    ``U (B,p+m,n)`` = ``[A; G] L⁻ᵀ`` (the rows of ``[U_A U_G]ᵀ``), ``R (B,p,p)``, ``T (B,p,m)``
    and ``P (B,m,m)`` (symmetric up to round-off; the factorization reads one triangle)."""

    L: Tensor
    U: Tensor
    R: Tensor
    T: Tensor
    P: Tensor

    def select(self, idx: Tensor) -> ReducedQPKKT:
        return ReducedQPKKT(*(t.index_select(0, idx) for t in self._fields()))

    def factor(self, w: Tensor, reg: float) -> ReducedQPKKTFactor:
        """Factor ``K = P + W + δI`` for the diagonal ``w ≥ 0`` ``(B, m)``."""
        w_reg = w + reg
        K = self.P.clone()
        K.diagonal(dim1=-2, dim2=-1).add_(w_reg)
        LK, info = cholesky_lower(K)
        ok = (info == 0) & torch.isfinite(LK.diagonal(dim1=-2, dim2=-1)).all(-1)
        return ReducedQPKKTFactor(self, LK, w_reg, ok)

    def masked(self, keep: Tensor) -> ReducedQPKKT:
        """The system with the inequality rows outside ``keep`` ``(B, m)`` zeroed (``G`` →
        ``diag(keep) G``): the derivative system of an active set."""
        k = keep.to(self.P.dtype)
        p = self.R.shape[-1]
        U = torch.cat([self.U[..., :p, :], self.U[..., p:, :] * k.unsqueeze(-1)], dim=-2)
        return ReducedQPKKT(self.L, U, self.R, self.T * k.unsqueeze(-2),
                            self.P * k.unsqueeze(-1) * k.unsqueeze(-2))

    def _fields(self) -> tuple[Tensor, ...]:
        return (self.L, self.U, self.R, self.T, self.P)


def reduce_qp_kkt(Q: Tensor, A: Tensor, G: Tensor) -> ReducedQPKKT | None:
    """The reduced system of ``Q (B,n,n)``, ``A (B,p,n)``, ``G (B,m,n)``, or ``None`` when
    ``Q`` or ``A Q⁻¹ Aᵀ`` is not positive definite and well conditioned for every sample."""
    p = A.shape[-2]
    L, info = cholesky_lower(Q)
    if not _well_conditioned(L, info):
        return None
    L = L.contiguous()  # row-major: the iteration multiplies by it (r_d = L r̃_d) every step
    U = torch.linalg.solve_triangular(L.mT, torch.cat([A, G], dim=-2), upper=True, left=False)
    gram = U @ U.mT  # [[AQ⁻¹Aᵀ, AQ⁻¹Gᵀ], [GQ⁻¹Aᵀ, GQ⁻¹Gᵀ]]
    if p == 0:
        return ReducedQPKKT(L, U, Q.new_zeros(Q.shape[0], 0, 0), gram[..., :0, :], gram)
    R, info = cholesky_lower(gram[..., :p, :p])
    if not _well_conditioned(R, info):
        return None
    T = tri(R, gram[..., :p, p:])
    return ReducedQPKKT(L, U, R, T, torch.baddbmm(gram[..., p:, p:], T.mT, T, alpha=-1))


@dataclass
class ReducedQPKKTFactor(PerSampleFactor):
    """A factorization of ``M`` in the reduced order; same interface as
    :class:`~implicit_layers.linalg.kkt.inequality.PrimalKKTFactor`, except that :meth:`solve_and_product`
    works in the whitened coordinates ``x̃ = Lᵀx`` in which an interior point iterates
    (see :mod:`implicit_layers.solvers.qp.data`): there ``Q = I`` and ``[A; G] = U``."""

    base: ReducedQPKKT
    LK: Tensor     # (B, m, m) Cholesky factor of K
    w_reg: Tensor  # (B, m) the diagonal K adds to P: w + δ
    ok: Tensor

    def solve(self, r1: Tensor, r2: Tensor, r3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Solve ``M z = r`` for right-hand sides ``(..., B, k)`` (extra dims broadcast)."""
        L = self.base.L
        z1, z2, z3, _ = self.solve_and_product(tri(L, r1.unsqueeze(-1)).squeeze(-1), r2, r3)
        return tri(L, z1.unsqueeze(-1), transpose=True).squeeze(-1), z2, z3

    def solve_and_product(self, r1: Tensor | None, r2: Tensor | None, r3: Tensor) -> tuple[Tensor, ...]:
        """``(z̃₁, z₂, z₃, G z₁)`` for the whitened right-hand side ``(L⁻¹r₁, r₂, r₃)``, ``z₁ = L⁻ᵀz̃₁``
        (module docstring with ``y = r₁``); ``r₁ = r₂ = None`` stand for zeros. Row 3 of ``M``
        gives the product for free: ``G z₁ = r₃ + (w + δ) z₃`` exactly for the regularized K."""
        b, p = self.base, self.base.R.shape[-1]
        rhs3, u = -r3, None
        if r1 is not None:
            Uy = mv(b.U, r1)
            rhs3 = rhs3 + Uy[..., p:]
            if p > 0:
                assert r2 is not None, "r₂ = None stands for zeros only with r₁ = None"
                u = tri(b.R, (Uy[..., :p] - r2).unsqueeze(-1)).squeeze(-1)
                rhs3 = rhs3 - mv(b.T.mT, u)
        z3 = tri(self.LK, tri(self.LK, rhs3.unsqueeze(-1)), transpose=True).squeeze(-1)
        if p > 0:
            t = -mv(b.T, z3) if u is None else u - mv(b.T, z3)
            z2 = tri(b.R, t.unsqueeze(-1), transpose=True).squeeze(-1)
            z1 = -mv(b.U.mT, torch.cat([z2, z3], dim=-1))
        else:
            z2, z1 = z3[..., :0], -mv(b.U.mT, z3)
        if r1 is not None:
            z1 = z1 + r1
        return self._masked(z1, z2, z3, r3 + self.w_reg * z3)

    @classmethod
    def identity(cls, base: ReducedQPKKT) -> ReducedQPKKTFactor:
        """Placeholder factors (``ok = False``) for the whole batch, to be filled by :meth:`put_`."""
        B, m = base.P.shape[0], base.P.shape[-1]
        eye = torch.eye(m, dtype=base.P.dtype, device=base.P.device).repeat(B, 1, 1)
        return cls(base, eye, base.P.new_ones(B, m), torch.zeros(B, dtype=torch.bool, device=eye.device))

    def select(self, idx: Tensor) -> ReducedQPKKTFactor:
        return ReducedQPKKTFactor(self.base.select(idx), *(t.index_select(0, idx) for t in self._varying()))

    def repeat(self, k: int) -> ReducedQPKKTFactor:
        """The same factors for a batch repeated ``k`` times: ``(k·B, ...)``."""
        rep = lambda t: t.repeat(k, *([1] * (t.ndim - 1)))  # noqa: E731
        return ReducedQPKKTFactor(ReducedQPKKT(*(rep(t) for t in self.base._fields())),
                                  *(rep(t) for t in self._varying()))

    def _varying(self) -> tuple[Tensor, ...]:
        return (self.LK, self.w_reg, self.ok)
