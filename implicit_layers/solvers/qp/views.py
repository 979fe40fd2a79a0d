"""A batch of (equilibrated) QPs as the interior point iterates on it: in the problem's own
coordinates, or in whitened ones when ``Q`` is positive definite.

:class:`PrimalView` keeps ``x``; its Newton systems are factored as the regularized
``Q + ρI + AᵀA/δ + Gᵀ(W + δI)⁻¹G`` (:mod:`implicit_layers.linalg.kkt.inequality`), which
handles any positive semidefinite ``Q`` (LPs included) and dependent equality rows.
:class:`WhitenedView` substitutes ``x = L⁻ᵀx̃`` with ``Q = LLᵀ``: the problem becomes
``min ½‖x̃‖² + (L⁻¹c)ᵀx̃ s.t. U x̃ ⋚ (b, bounds)``, ``U = [A; G] L⁻ᵀ``, so ``Q`` drops out of
every product, and its systems are factored in the reduced order of
:mod:`implicit_layers.linalg.kkt.reduced` (one ``m × m`` Cholesky per iteration). Objective,
constraint values, multipliers and slacks are the same in both coordinates; only dual-space
vectors change, ``r_d = L r̃_d``, and the stopping test measures them in the original ones.

Both expose: ``c`` (in the iteration's coordinates), ``products``, ``original``, ``factor``,
``placeholder``, ``to_original``, ``select`` and ``may_be_unbounded``.
"""

from __future__ import annotations

from typing import TypeGuard

import torch
from torch import Tensor

from implicit_layers.linalg.kkt.inequality import PrimalKKT, PrimalKKTFactor, kkt_product, mv, tri_vec
from implicit_layers.linalg.kkt.reduced import ReducedQPKKT, ReducedQPKKTFactor, reduce_qp_kkt
from implicit_layers.solvers.qp.problem import QPProblem


class PrimalView:
    """The problem in its own coordinates (any positive semidefinite ``Q``)."""

    may_be_unbounded = True

    def __init__(self, problem: QPProblem, kkt: PrimalKKT, data_scale: Tensor | None = None):
        self.problem, self.kkt, self.c = problem, kkt, problem.c
        self.data_scale = _data_scale(problem) if data_scale is None else data_scale

    def select(self, idx: Tensor) -> PrimalView:
        return PrimalView(self.problem.select(idx), self.kkt.select(idx), self.data_scale[idx])

    def products(self, x: Tensor, lam: Tensor, mu: Tensor) -> tuple[Tensor, ...]:
        """``(Qx, Ax, Gx, Aᵀλ + Gᵀμ)``."""
        P = self.problem
        return mv(P.Q, x), mv(P.A, x), mv(P.G, x), mv(P.A.mT, lam) + mv(P.G.mT, mu)

    def original(self, *vectors: Tensor) -> tuple[Tensor, ...]:
        """Dual-space vectors (``r_d``, ``Qx``, ...) in the problem's coordinates."""
        return vectors

    def kkt_product(self, w: Tensor, z1: Tensor, z2: Tensor, z3: Tensor) -> tuple[Tensor, ...]:
        """``M z`` with the exact (unregularized) ``M`` of the diagonal ``w``."""
        P = self.problem
        return kkt_product(P.Q, P.A, P.G, w, z1, z2, z3)

    def factor(self, w: Tensor, reg: float) -> PrimalKKTFactor:
        return self.kkt.factor(w)

    def placeholder(self) -> PrimalKKTFactor:
        P = self.problem
        return PrimalKKTFactor.identity(P.Q, P.A, P.G, self.kkt.delta)

    def to_original(self, x: Tensor) -> Tensor:
        return x


class WhitenedView:
    """The problem in the coordinates ``x̃ = Lᵀx`` (``Q = LLᵀ`` positive definite)."""

    may_be_unbounded = False

    def __init__(self, problem: QPProblem, system: ReducedQPKKT, data_scale: Tensor | None = None):
        self.problem, self.system = problem, system
        self.c = tri_vec(system.L, problem.c)
        self.data_scale = _data_scale(problem) if data_scale is None else data_scale

    def select(self, idx: Tensor) -> WhitenedView:
        return WhitenedView(self.problem.select(idx), self.system.select(idx), self.data_scale[idx])

    def products(self, x: Tensor, lam: Tensor, mu: Tensor) -> tuple[Tensor, ...]:
        """``(Q̃x̃, Ãx̃, G̃x̃, Ãᵀλ + G̃ᵀμ)`` with ``Q̃ = I`` and ``[Ã; G̃] = U``: two products."""
        U, p = self.system.U, lam.shape[-1]
        Ux = mv(U, x)
        return x, Ux[..., :p], Ux[..., p:], mv(U.mT, torch.cat([lam, mu], -1))

    def original(self, *vectors: Tensor) -> tuple[Tensor, ...]:
        """Dual-space vectors in the original coordinates, ``v = L ṽ``, in one pass over ``L``."""
        return tuple((torch.stack(vectors, dim=-2) @ self.system.L.mT).unbind(-2))

    def kkt_product(self, w: Tensor, z1: Tensor, z2: Tensor, z3: Tensor) -> tuple[Tensor, ...]:
        """``M̃ z`` with ``Q̃ = I`` and ``[Ã; G̃] = U`` (exact, unregularized)."""
        U, p = self.system.U, z2.shape[-1]
        Uz = mv(U, z1)
        return z1 + mv(U.mT, torch.cat([z2, z3], -1)), Uz[..., :p], Uz[..., p:] - w * z3

    def factor(self, w: Tensor, reg: float) -> ReducedQPKKTFactor:
        return self.system.factor(w, reg)

    def placeholder(self) -> ReducedQPKKTFactor:
        return ReducedQPKKTFactor.identity(self.system)

    def to_original(self, x: Tensor) -> Tensor:
        return tri_vec(self.system.L, x, transpose=True)


def _data_scale(P: QPProblem) -> Tensor:
    """``1 + max |entry|`` of ``Q, A, G`` per sample (the certificates' scale)."""
    flat = [t.flatten(1).abs().amax(-1) for t in (P.Q, P.A, P.G) if t[0].numel()]
    return 1 + (torch.stack(flat).amax(0) if flat else P.c.new_zeros(P.c.shape[0]))


def make_view(problem: QPProblem, whiten: bool, reg: float) -> PrimalView | WhitenedView:
    """The iteration's view; whitened if asked for and ``Q`` (and ``A Q⁻¹ Aᵀ``) are positive
    definite and well conditioned for every sample, else primal with regularization ``reg``
    (the interior point keeps ``w`` positive: no regularization of the inequality block)."""
    P = problem
    if whiten and P.G.shape[-2] > 0:
        system = reduce_qp_kkt(P.Q, P.A, P.G)
        if system is not None:
            return WhitenedView(problem, system)
    return PrimalView(problem, PrimalKKT(P.Q, P.A, P.G, rho=reg, delta=reg, delta_ineq=0.0))


def is_whitened(view: object) -> TypeGuard[WhitenedView]:
    return isinstance(view, WhitenedView)

