"""A batched line search for the strong Wolfe conditions (bracketing and zoom).

Along ``φ(α) = f(y + α d)`` each sample looks for a step with

    sufficient decrease:  φ(α) ≤ φ(0) + c₁ α φ'(0) + ε
    curvature:            |φ'(α)| ≤ c₂ |φ'(0)|

(Nocedal & Wright, Algorithms 3.5 and 3.6). ``ε`` is a few rounding errors of ``φ(0)``: near a
minimizer, values stop resolving progress long before gradients do (``φ(0) − φ* ≈ ½‖∇f‖²/L``
drops below ``eps·|φ(0)|`` once ``‖∇f‖ ≲ √eps``), so decisions the values cannot make are left
to the derivatives, which stay accurate; that is what lets the minimizers reach gradient norms
near ``eps`` instead of stalling at ``√eps``.

All samples advance together, one batched evaluation per round; each keeps its own bracket
and stops on its own. Trial steps inside a bracket come from the secant of ``φ'`` when the
derivative changes sign across it (exact for quadratics) and from the cubic interpolating
both ends otherwise, kept away from the ends; a non-finite trial value shrinks the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Evaluate = Callable[[Tensor], tuple[Tensor, Tensor]]

_BRACKETING, _ZOOM, _DONE = 0, 1, 2


@dataclass
class LineSearchResult:
    """Per-sample outcome: the step ``alpha``, ``f`` and gradient ``g`` at ``y + alpha d``;
    ``wolfe`` where both conditions hold, ``decrease`` where at least the first holds
    (``alpha > 0``); ``evaluations``: batched evaluations made."""

    alpha: Tensor
    f: Tensor
    g: Tensor
    wolfe: Tensor
    decrease: Tensor
    evaluations: int


class _Point:
    """A step ``a`` with its value ``f``, directional derivative ``dg`` and gradient ``g``."""

    def __init__(self, a: Tensor, f: Tensor, dg: Tensor, g: Tensor):
        self.a, self.f, self.dg, self.g = a, f, dg, g

    def where(self, mask: Tensor, other: _Point) -> _Point:
        """This point where ``mask``, ``other`` elsewhere."""
        return _Point(torch.where(mask, self.a, other.a), torch.where(mask, self.f, other.f),
                      torch.where(mask, self.dg, other.dg),
                      torch.where(mask[:, None], self.g, other.g))


def _interpolate(lo: _Point, hi: _Point, guard: float = 0.05) -> Tensor:
    """A trial step strictly inside the bracket ``[lo.a, hi.a]`` (either orientation)."""
    width = hi.a - lo.a
    secant = lo.a - lo.dg * width / (hi.dg - lo.dg)
    d1 = lo.dg + hi.dg - 3 * (lo.f - hi.f) / (lo.a - hi.a)
    disc = d1 * d1 - lo.dg * hi.dg
    d2 = torch.sign(width) * disc.clamp_min(0).sqrt()
    cubic = hi.a - width * (hi.dg + d2 - d1) / (hi.dg - lo.dg + 2 * d2)
    cubic = torch.where(disc >= 0, cubic, torch.full_like(cubic, float("nan")))
    trial = torch.where(lo.dg * hi.dg < 0, secant, cubic)
    trial = torch.where(torch.isfinite(trial), trial, lo.a + 0.5 * width)
    ends = torch.stack([lo.a + guard * width, hi.a - guard * width])
    return torch.minimum(torch.maximum(trial, ends.amin(0)), ends.amax(0))


def _extrapolate(prev: _Point, cur: _Point) -> Tensor:
    """A longer trial step when ``φ`` still descends at ``cur``: the secant root of ``φ'``,
    between 2 and 10 times the current step."""
    secant = cur.a - cur.dg * (cur.a - prev.a) / (cur.dg - prev.dg)
    secant = torch.where(torch.isfinite(secant) & (cur.dg > prev.dg), secant, 10 * cur.a)
    return secant.clamp(2 * cur.a, 10 * cur.a)


def strong_wolfe(evaluate: Evaluate, y: Tensor, f0: Tensor, g0: Tensor, d: Tensor,
                 alpha0: Tensor, active: Tensor, c1: float = 1e-4, c2: float = 0.9,
                 max_evaluations: int = 20) -> LineSearchResult:
    """Search along descent directions ``d`` (B, n) from ``y`` (B, n) for the samples in
    ``active`` (B,); ``evaluate(y) → (f (B,), ∇f (B, n))``, ``f0``/``g0`` its values at ``y``,
    ``alpha0`` (B,) the first trial steps. Inactive samples return ``alpha = 0``.

    >>> import torch
    >>> f = lambda y: (((y - 2) ** 2).sum(-1), 2 * (y - 2))          # minimum at y = 2
    >>> y = torch.zeros(1, 1, dtype=torch.float64)
    >>> f0, g0 = f(y)
    >>> res = strong_wolfe(f, y, f0, g0, -g0, torch.full((1,), 0.01, dtype=torch.float64),
    ...                    torch.ones(1, dtype=torch.bool), c2=0.1)
    >>> res.alpha, bool(res.wolfe), res.evaluations       # steps 0.01, 0.1, then the minimizer
    (tensor([0.5000], dtype=torch.float64), True, 3)
    """
    dg0 = (g0 * d).sum(-1)
    slack = 8 * torch.finfo(f0.dtype).eps * f0.abs()
    zero = torch.zeros_like(f0)
    start = _Point(zero, f0, dg0, g0)
    prev, lo, hi, best = start, start, start, start
    stage = torch.where(active, _BRACKETING, _DONE)
    a = torch.where(active, alpha0, zero)
    evaluations = 0
    for _ in range(max_evaluations):
        searching = stage < _DONE
        if not bool(searching.any()):
            break
        f, g = evaluate(y + torch.where(searching, a, zero)[:, None] * d)
        evaluations += 1
        dg = (g * d).sum(-1)
        finite = torch.isfinite(f) & torch.isfinite(dg)
        cur = _Point(a, torch.where(finite, f, torch.full_like(f, float("inf"))),
                     torch.where(finite, dg, torch.full_like(dg, float("nan"))), g)
        armijo = finite & (cur.f <= f0 + c1 * a * dg0 + slack)
        curvature = finite & (dg.abs() <= -c2 * dg0)

        # bracketing: the step is too long (hi = cur), acceptable, past the minimum
        # (lo = cur, hi = prev), or still descending (extend)
        bracketing = stage == _BRACKETING
        overshoot = bracketing & (~armijo | ((prev.a > 0) & (cur.f > prev.f + slack)))
        found = bracketing & ~overshoot & curvature
        turned = bracketing & ~overshoot & ~found & (dg >= 0)
        extend = bracketing & ~(overshoot | found | turned)
        # zoom: shrink [lo, hi] around a point with sufficient decrease and the lowest value
        zooming = stage == _ZOOM
        too_far = zooming & (~armijo | (cur.f > lo.f + slack))
        z_found = zooming & ~too_far & curvature
        moved = zooming & ~too_far & ~z_found
        flip = moved & (dg * (hi.a - lo.a) >= 0)

        best = cur.where(found | z_found, best)
        new_lo = prev.where(overshoot, cur.where(turned | moved, lo))
        new_hi = cur.where(overshoot | too_far, prev.where(turned, lo.where(flip, hi)))
        longer = _extrapolate(prev, cur)
        prev = cur.where(extend, prev)
        lo, hi = new_lo, new_hi
        stage = torch.where(found | z_found, _DONE,
                            torch.where(overshoot | turned, _ZOOM, stage))
        a = torch.where(extend, longer, torch.where(stage == _ZOOM, _interpolate(lo, hi), a))
    wolfe = (stage == _DONE) & active
    # no Wolfe step within the budget: fall back to the lowest point with sufficient decrease
    fallback = lo.where(stage == _ZOOM, prev)
    out = best.where(wolfe, fallback)
    return LineSearchResult(out.a, out.f, out.g, wolfe, active & (out.a > 0), evaluations)
