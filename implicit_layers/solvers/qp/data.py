"""A batch of QPs as the interior point iterates on it: in the original coordinates, or in
whitened ones when ``Q`` is positive definite.

    min_x ½ xᵀQx + cᵀx   s.t.  C x ⋚ d,   C = [A; G],  d = [b; h]   (first p rows equalities)

:class:`PrimalData` keeps ``x``; its Newton systems are factored as ``Q + GᵀW⁻¹G``
(:mod:`implicit_layers.linalg.kkt.inequality`). :class:`WhitenedData` substitutes ``x = L⁻ᵀx̃`` with
``Q = LLᵀ``: the problem becomes ``min ½‖x̃‖² + (L⁻¹c)ᵀx̃ s.t. (C L⁻ᵀ) x̃ ⋚ d``, so ``Q`` drops
out of every product, and its systems are factored in the reduced order of
:mod:`implicit_layers.linalg.kkt.reduced`, whose ``U = C L⁻ᵀ`` is the whitened constraint
matrix itself. Objective, constraint values, multipliers and slacks are the same in both
coordinates; only dual-space vectors change, ``r_d = L r̃_d``, and the stopping test measures them
in the original coordinates.

Both expose the same interface to the solver: ``select``, ``products``, ``original``,
``factor``, ``placeholder``, ``to_original``, ``may_be_unbounded`` and the per-sample scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from implicit_layers.linalg.kkt.inequality import QPKKTFactor, _mv, _tri, factor_qp_kkt
from implicit_layers.linalg.kkt.reduced import ReducedQPKKT, ReducedQPKKTFactor, reduce_qp_kkt


def _inf(t: Tensor) -> Tensor:
    """Per-sample ∞-norm over the last dim (0 for empty dims)."""
    return t.abs().amax(-1) if t.shape[-1] > 0 else t.new_zeros(t.shape[:-1])


@dataclass
class _Common:
    c: Tensor       # (B, n) in the iteration's coordinates
    d: Tensor       # (B, p+m)
    p: int
    c_scale: Tensor  # (B,) 1 + ‖c‖∞ in the original coordinates (stopping test)
    d_scale: Tensor  # (B,) 1 + ‖d‖∞
    scale: Tensor    # (B,) 1 + the largest |entry| of Q, C (infeasibility certificates)

    def _pick(self, idx: Tensor) -> dict:
        pick = lambda t: t.index_select(0, idx)  # noqa: E731
        return {"c": pick(self.c), "d": pick(self.d), "p": self.p, "c_scale": pick(self.c_scale),
                "d_scale": pick(self.d_scale), "scale": pick(self.scale)}


@dataclass
class PrimalData(_Common):
    Q: Tensor = None  # (B, n, n)
    C: Tensor = None  # (B, p+m, n)
    may_be_unbounded = True  # Q may be singular

    def select(self, idx: Tensor) -> PrimalData:
        return PrimalData(**self._pick(idx), Q=self.Q.index_select(0, idx), C=self.C.index_select(0, idx))

    def products(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(Qx, Cx, Cᵀy)``."""
        return _mv(self.Q, x), _mv(self.C, x), _mv(self.C.mT, y)

    def original(self, *vectors: Tensor) -> tuple[Tensor, ...]:
        """Dual-space vectors (``r_d``, ``Qx``, ``Cᵀy``) in the original coordinates."""
        return vectors

    def factor(self, Winv: Tensor, reg: float) -> QPKKTFactor:
        return factor_qp_kkt(self.Q, self.C[..., :self.p, :], self.C[..., self.p:, :], Winv, reg)

    def placeholder(self) -> QPKKTFactor:
        return QPKKTFactor.identity(self.Q, self.C[..., :self.p, :], self.C[..., self.p:, :])

    def to_original(self, x: Tensor) -> Tensor:
        return x


@dataclass
class WhitenedData(_Common):
    system: ReducedQPKKT = None  # its L (Q = LLᵀ) and U = C L⁻ᵀ define the coordinates
    may_be_unbounded = False  # Q is positive definite

    def select(self, idx: Tensor) -> WhitenedData:
        return WhitenedData(**self._pick(idx), system=self.system.select(idx))

    def products(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(Q̃x̃, C̃x̃, C̃ᵀy)`` with ``Q̃ = I``, ``C̃ = U``."""
        return x, _mv(self.system.U, x), _mv(self.system.U.mT, y)

    def original(self, *vectors: Tensor) -> tuple[Tensor, ...]:
        """Dual-space vectors in the original coordinates, ``v = L ṽ`` (``r_d = L r̃_d``,
        ``Qx = L x̃``, ``Cᵀy = L Uᵀy``), in one pass over ``L`` (zeros above its diagonal)."""
        return tuple((torch.stack(vectors, dim=-2) @ self.system.L.mT).unbind(-2))

    def factor(self, Winv: Tensor, reg: float) -> ReducedQPKKTFactor:
        return self.system.factor(Winv, reg)

    def placeholder(self) -> ReducedQPKKTFactor:
        return ReducedQPKKTFactor.identity(self.system)

    def to_original(self, x: Tensor) -> Tensor:
        return _tri(self.system.L, x.unsqueeze(-1), transpose=True).squeeze(-1)


def qp_data(Q, c, A, b, G, h, whiten: bool) -> PrimalData | WhitenedData:
    """The iteration's view of a flat batch; whitened if asked for and ``Q`` (and
    ``A Q⁻¹ Aᵀ``) are positive definite and well conditioned for every sample."""
    d, p = torch.cat([b, h], dim=-1), A.shape[-2]
    common = {"d": d, "p": p, "c_scale": 1 + _inf(c), "d_scale": 1 + _inf(d)}
    system = reduce_qp_kkt(Q, A, G) if whiten and G.shape[-2] > 0 else None
    if system is None:
        scale = 1 + torch.stack([_inf(t.flatten(1)) for t in (Q, A, G)]).amax(0)
        return PrimalData(c=c, **common, scale=scale, Q=Q, C=torch.cat([A, G], dim=-2))
    scale = 1 + _inf(system.U.flatten(1)).clamp_min(1)  # of Q̃ = I and C̃ = U
    return WhitenedData(c=_tri(system.L, c.unsqueeze(-1)).squeeze(-1), **common, scale=scale, system=system)
