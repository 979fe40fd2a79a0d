"""The interior point's iterate: the constraint sides a batch has, the primal-dual state on
them, and a well-centred initial point (:mod:`implicit_layers.solvers.qp.interior_point`)."""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.solvers.qp.problem import QPProblem


class Sides:
    """The constraint sides a batch has: upper (``u − Gx ≥ 0``) and/or lower (``Gx − l ≥ 0``),
    stacked along a dim of size ``S ∈ {1, 2}`` so that one op serves both; a batch with no
    lower bound at all pays for one side only.

    Attributes: ``sign`` ``(S, 1)`` +1 for upper, −1 for lower; ``bound`` ``(B, S, m)`` (0 where
    absent); ``mask`` ``(B, S, m)`` 1.0 where present; ``count`` ``(B,)`` present sides."""

    def __init__(self, P: QPProblem):
        lower, upper = P.finite_bounds()
        dtype = lower.dtype
        sides = [(1.0, upper, P.has_upper)] if bool(P.has_upper.any()) else []
        if bool(P.has_lower.any()) or not sides:
            sides.append((-1.0, lower, P.has_lower))
        self.sign = torch.tensor([[sg] for sg, _, _ in sides], dtype=dtype, device=lower.device)
        self.bound = torch.stack([b for _, b, _ in sides], 1)
        self.mask = torch.stack([f for _, _, f in sides], 1).to(dtype)
        self.count = self.mask.sum((1, 2)).clamp_min(1)

    def select(self, idx: Tensor) -> Sides:
        out = Sides.__new__(Sides)
        out.sign = self.sign
        out.bound, out.mask, out.count = (t.index_select(0, idx) for t in (self.bound, self.mask, self.count))
        return out

    def upper_lower(self, t: Tensor, fill: float) -> tuple[Tensor, Tensor]:
        """``t (B, S, m)`` split into its upper and lower sides (``fill`` where absent)."""
        full = torch.full_like(t[:, 0], fill)
        up = t[:, 0] if float(self.sign[0]) > 0 else full
        lo = t[:, -1] if float(self.sign[-1]) < 0 else full
        return up, lo


class State:
    """The iterate in the iteration's coordinates: ``x, λ`` and, per constraint side,
    multipliers ``z`` and slacks ``s`` ``(B, S, m)`` (absent sides hold ``z = 0, s = 1`` and
    never move); ``μ = Σ_k sign_k z_k``."""

    def __init__(self, x, lam, z, s):
        self.x, self.lam, self.z, self.s = x, lam, z, s

    def tensors(self):
        return (self.x, self.lam, self.z, self.s)

    def mu(self, sides: Sides) -> Tensor:
        return (sides.sign * self.z).sum(1)

    def select(self, idx: Tensor) -> State:
        return State(*(t.index_select(0, idx) for t in self.tensors()))

    def advance_(self, idx: Tensor | None, step, alpha: Tensor) -> None:
        """``v ← v + α dv`` for every variable, in place (``idx``: the rows of the batch)."""
        for v, dv in zip(self.tensors(), step, strict=True):
            a = alpha.reshape(-1, *([1] * (v.ndim - 1)))
            if idx is None:
                v.add_(a * dv)
            else:
                v.index_add_(0, idx, a * dv)


def initial_point(view, P: QPProblem, sides: Sides, reg: float) -> State:
    """Solve the KKT system with ``W = I`` and ``Gx`` pulled towards the middle of the bounds,
    then shift slacks and multipliers into the interior and take their geometric mean for
    both (``s = z``): a well-centred start."""
    f, b = sides.mask, sides.bound
    count = f.sum(1)  # sides per row
    target = (f * b).sum(1) / count.clamp_min(1)
    fac = view.factor(torch.ones_like(target), reg)
    x, lam, mu, Gx = fac.solve_and_product(-view.c, P.b, target)
    sg = sides.sign

    def shift(v: Tensor) -> Tensor:  # positive on the present sides, preserving differences
        if v.shape[-1] == 0:  # no inequality constraints
            return v
        worst = torch.where(f > 0, -v, torch.full_like(v, -float("inf"))).amax(-1, keepdim=True)
        worst = torch.where(torch.isfinite(worst), worst, torch.zeros_like(worst))
        return torch.where(worst >= 0, v + 1 + worst, v)

    s = shift(sg * (b - Gx.unsqueeze(1)))
    z = shift(sg * mu.unsqueeze(1))
    s = torch.where(f > 0, (s * z).sqrt(), 1.0)
    return State(x, lam, s * f, s.clone())
