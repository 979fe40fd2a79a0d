"""A flat batch of convex QPs in the form every QP solver here reads, and its equilibration.

    min_x ½ xᵀQx + cᵀx   s.t.  Ax = b,   l ≤ Gx ≤ u

``Q (B,n,n)`` symmetric positive semidefinite, ``A (B,p,n)``, ``G (B,m,n)``. A bound that is
infinite, or at least :data:`INFINITY` in magnitude, means "no bound" on that side: it is
dropped from the solve, its multiplier is zero and it receives no gradient. A row with no
finite bound at all is kept as the trivial constraint ``−1 ≤ 0ᵀx ≤ 1`` so that shapes stay
fixed.

:meth:`QPProblem.equilibrated` rescales the problem (modified Ruiz equilibration of the KKT
matrix ``[[Q, Cᵀ], [C, 0]]``, ``C = [A; G]``, plus a cost scale) so that the solvers'
regularizations and tolerances mean the same at every scale of the data; the stopping test
is always measured in the original problem.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

#: bounds at least this large in magnitude count as absent (OSQP's convention)
INFINITY = 1e20


def inf_norm(t: Tensor) -> Tensor:
    """Per-sample ∞-norm over the last dim (0 for an empty dim)."""
    return t.abs().amax(-1) if t.shape[-1] > 0 else t.new_zeros(t.shape[:-1])


def mv(M: Tensor, v: Tensor) -> Tensor:
    """``M v`` for ``M (B, r, k)`` and ``v (..., B, k)``, written as the row vector ``vᵀMᵀ``:
    on CPU, batched matrix @ column was several times slower than row @ matrix."""
    return (v.unsqueeze(-2) @ M.mT).squeeze(-2)


@dataclass
class QPProblem:
    """One flat batch of QPs with normalized bounds.

    Attributes:
        Q, c, A, b, G: the data (``G`` has zero rows where both bounds are absent).
        lower, upper: ``(B, m)`` bounds, ``±inf`` where absent.
        has_lower, has_upper: ``(B, m)`` masks of the finite bounds.
    """

    Q: Tensor
    c: Tensor
    A: Tensor
    b: Tensor
    G: Tensor
    lower: Tensor
    upper: Tensor
    has_lower: Tensor
    has_upper: Tensor

    @classmethod
    def from_data(cls, Q, c, A, b, G, lower, upper) -> QPProblem:
        """Normalize the bounds: ``|bound| ≥ INFINITY`` → ``±inf``; rows with no finite bound
        become ``−1 ≤ 0ᵀx ≤ 1``."""
        inf = torch.tensor(float("inf"), dtype=c.dtype, device=c.device)
        has_upper = upper < INFINITY
        has_lower = lower > -INFINITY
        dead = ~(has_upper | has_lower)
        if bool(dead.any()):
            G = torch.where(dead.unsqueeze(-1), torch.zeros((), dtype=G.dtype, device=G.device), G)
            has_upper, has_lower = has_upper | dead, has_lower | dead
            upper = torch.where(dead, torch.ones_like(upper), upper)
            lower = torch.where(dead, -torch.ones_like(lower), lower)
        upper = torch.where(has_upper, upper, inf)
        lower = torch.where(has_lower, lower, -inf)
        return cls(Q, c, A, b, G, lower, upper, has_lower, has_upper)

    @property
    def batch(self) -> int:
        return self.Q.shape[0]

    @property
    def sizes(self) -> tuple[int, int, int]:
        """``(n, p, m)``."""
        return self.Q.shape[-1], self.A.shape[-2], self.G.shape[-2]

    def select(self, idx: Tensor) -> QPProblem:
        return QPProblem(*(getattr(self, f).index_select(0, idx) for f in self.__dataclass_fields__))

    def to(self, dtype: torch.dtype) -> QPProblem:
        """The same problem with its floating data in ``dtype``."""
        return QPProblem(*(t.to(dtype) if t.is_floating_point() else t
                           for t in (getattr(self, f) for f in self.__dataclass_fields__)))

    def finite_bounds(self) -> tuple[Tensor, Tensor]:
        """The bounds with absent sides set to 0 (safe in products)."""
        zero = torch.zeros((), dtype=self.c.dtype, device=self.c.device)
        return (torch.where(self.has_lower, self.lower, zero),
                torch.where(self.has_upper, self.upper, zero))

    def equilibrated(self, iterations: int = 4) -> tuple[QPProblem, Scaling]:
        """The rescaled problem ``(D Q D σ, D c σ, E_A A D, E_A b, E_G G D, E_G l, E_G u)`` and
        the :class:`Scaling` that maps its solutions back.

        Modified Ruiz: repeatedly divide every row and column of ``[[Q, Cᵀ], [C, 0]]`` by the
        square root of its ∞-norm (clamped to [1e-2, 1e2] per step), then scale the cost so
        that ``σ max(‖Q‖, ‖c‖) ≈ 1`` (OSQP's recipe, without its clamp of σ to [1e-4, 1e4]:
        with it, a cost scaled by 1e-8 kept a scale of 1e-4, against which the solver's
        absolute floors accepted a point 7 % off as solved). Rows with zero norm are left
        alone. The norms are read off ``|Q|``, ``|A|``, ``|G|`` (taken once) and the running
        scalings; the scaled matrices are formed once, at the end."""
        Q, c, A, G = self.Q, self.c, self.A, self.G
        aQ, aA, aG = Q.abs(), A.abs(), G.abs()
        D = torch.ones_like(c)
        E_A = torch.ones_like(self.b)
        E_G = torch.ones_like(self.lower)
        if _well_scaled(aQ, aA, aG):  # every row and column norm within [1/4, 4] already
            iterations = 0
        for _ in range(iterations):
            # the norms of the scaled |M|: max_i |M_ij| r_i c_j = c_j · max_i (|M_ij| r_i) for
            # positive scalings, one product per matrix and side
            col = torch.maximum(_abs_col_norm(aQ * D.unsqueeze(-1)) * D if Q.shape[-1] else D,
                                torch.maximum(_abs_col_norm(aA * E_A.unsqueeze(-1)),
                                              _abs_col_norm(aG * E_G.unsqueeze(-1))) * D)
            d = _ruiz_factor(col)
            Dr = D.unsqueeze(-2)  # column scales as a row
            e_A = _ruiz_factor(_abs_row_norm(aA * Dr) * E_A)
            e_G = _ruiz_factor(_abs_row_norm(aG * Dr) * E_G)
            D, E_A, E_G = D * d, E_A * e_A, E_G * e_G
        Dr = D.unsqueeze(-2)
        Qs = Q * D.unsqueeze(-1) * Dr
        As, Gs = A * E_A.unsqueeze(-1) * Dr, G * E_G.unsqueeze(-1) * Dr
        cs = D * c
        cost = torch.maximum(inf_norm(Qs.flatten(1)), inf_norm(cs))
        sigma = torch.where(cost > 0, 1 / cost.clamp_min(torch.finfo(c.dtype).tiny), 1.0)
        scaled = QPProblem(Qs * sigma[:, None, None], cs * sigma[:, None], As, E_A * self.b, Gs,
                           E_G * self.lower, E_G * self.upper, self.has_lower, self.has_upper)
        return scaled, Scaling(D, E_A, E_G, sigma)


def _well_scaled(aQ: Tensor, aA: Tensor, aG: Tensor) -> bool:
    """Whether the KKT matrix's row and column ∞-norms all lie in [1/4, 4] (nonzero ones),
    for the entrywise absolute values ``aQ, aA, aG``."""
    cols = torch.maximum(_abs_col_norm(aQ), torch.maximum(_abs_col_norm(aA), _abs_col_norm(aG)))
    rows = torch.cat([_abs_row_norm(aA), _abs_row_norm(aG)], -1)
    return all(bool(((v == 0) | ((v >= 0.25) & (v <= 4))).all()) for v in (cols, rows))


def _abs_col_norm(aM: Tensor) -> Tensor:
    """Per-column maximum of the nonnegative ``aM (B, r, k)`` → ``(B, k)`` (0 for ``r = 0``)."""
    return aM.amax(-2) if aM.shape[-2] > 0 else aM.new_zeros(aM.shape[0], aM.shape[-1])


def _abs_row_norm(aM: Tensor) -> Tensor:
    """Per-row maximum of the nonnegative ``aM (B, r, k)`` → ``(B, r)`` (0 for ``k = 0``)."""
    return aM.amax(-1) if aM.shape[-1] > 0 else aM.new_zeros(aM.shape[:-1])


def _ruiz_factor(norm: Tensor) -> Tensor:
    """``1/√norm`` clamped to [1e-2, 1e2] (Ruiz step), 1 where the norm vanishes."""
    return torch.where(norm > 0, norm.clamp_min(torch.finfo(norm.dtype).tiny).rsqrt(), 1.0).clamp(1e-2, 1e2)


@dataclass
class Scaling:
    """``x = D x̃``, ``λ = E_A λ̃ / σ``, ``μ = E_G μ̃ / σ``, ``s = s̃ / E_G``."""

    D: Tensor
    E_A: Tensor
    E_G: Tensor
    sigma: Tensor

    def select(self, idx: Tensor) -> Scaling:
        return replace(self, **{f: getattr(self, f).index_select(0, idx) for f in self.__dataclass_fields__})

    def unscale(self, x: Tensor, lam: Tensor, mu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = self.sigma.unsqueeze(-1)
        return self.D * x, self.E_A * lam / s, self.E_G * mu / s

    def scale(self, x: Tensor, lam: Tensor, mu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = self.sigma.unsqueeze(-1)
        return x / self.D, lam * s / self.E_A, mu * s / self.E_G
