"""The active set of a QP solution: its derivative system, polishing, and the optimality test.

At a solution with active set 𝒜 (upper side, lower side, or neither, per row of ``G``), the
KKT conditions that stay true under a small perturbation of the data are

    F(y) = [ Qx + c + Aᵀλ + Gᵀμ ;  Ax − b ;  a⁺∘(Gx − u) + a⁻∘(Gx − l) − (1 − a)∘μ ] = 0

(``a = a⁺ + a⁻`` the active indicator, ``μ = 0`` off 𝒜), whose Jacobian in ``y = (x, λ, μ)`` is

    K = [ Q   Aᵀ  G_𝒜ᵀ ]
        [ A   0   0    ],     G_𝒜 = diag(a) G,   W = I − diag(a).
        [ G_𝒜 0  −W    ]

Every QP solver here ends by factoring ``K`` (:class:`ActiveSetKKT`): the same rule for the
interior point and OSQP, so the layers' gradients agree at degenerate points too.

*Gradient contract.* Where ``K`` is nonsingular the implicit gradient is exact, also with a
singular ``Q`` or non-unique multipliers. ``K`` is factored in a quasi-definite
regularization (:mod:`implicit_layers.linalg.kkt.inequality`) and every solve is refined
against the exact ``K``; where ``K`` is singular (dependent active constraints such as
duplicates, an LP at a degenerate vertex, ``x`` not locally unique) the refinement keeps the
regularized solution's null-space component, a defined and finite choice (the proximal
point of the regularization, near the minimum-norm solution). Such samples, and samples with
a weakly active constraint (active with ``μᵢ ≈ 0``, or inactive with zero slack), are flagged
``degenerate`` (a per-sample mask in the solution's stats and the layer's backward stats).

*Polishing* (after OSQP's idea): the point ``y = K⁻¹ (−c; b; a⁺∘u + a⁻∘l)`` is complementary
by construction; it replaces the solver's point when it is optimal (multiplier signs, the
inactive bounds, and the test of :func:`optimality_residual` at ``min(tol, √ε)``, so that a
loose ``tol`` cannot admit a wrong active set). Where it is not, up to :data:`CORRECTIONS`
primal-dual active-set updates (:func:`corrected`) are tried before giving up: the solver's
stopping test bounds residuals and the gap, not the distance to the solution, and a point
that is not polished keeps that distance (a random QP at n = 40 was 3e-5 away at a residual
of 7e-10). A sample is ``SOLVED`` exactly when its final point passes the test at ``tol``
and its derivative system was factored.

*Active set.* Row ``i`` is active on its upper side when ``μᵢ > 0`` and, in the equilibrated
problem, the multiplier exceeds the slack: ``σμᵢ/E_i ≥ E_i sᵢ⁺`` (at an interior point's
solution ``s z ≈ τ``: one of the two is tiny, the ratio is scale-free); likewise below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.linalg.kkt.inequality import PrimalKKT, PrimalKKTFactor, kkt_product, mv
from implicit_layers.linalg.kkt.reduced import ReducedQPKKT, ReducedQPKKTFactor
from implicit_layers.solvers.qp.base import QPSolution, QPStatus
from implicit_layers.solvers.qp.problem import QPProblem, Scaling, inf_norm


def optimality_residual(P: QPProblem, x: Tensor, lam: Tensor, mu: Tensor) -> Tensor:
    """The largest of the relative primal, dual and complementarity residuals of each sample
    in the problem's own units (the SOLVED test is ``≤ tol``):

    * ``‖Ax − b‖∞ / (1 + max(‖Ax‖∞, ‖b‖∞))`` and the largest bound violation over
      ``1 + max(‖Gx‖∞, |finite bounds|∞)``;
    * ``‖Qx + c + Aᵀλ + Gᵀμ‖∞ / (1 + max(‖Qx‖∞, ‖c‖∞, ‖Aᵀλ‖∞, ‖Gᵀμ‖∞))``, where a multiplier
      on a side without a bound counts as a violation too;
    * ``Σᵢ μᵢ⁺ |uᵢ − gᵢᵀx| + μᵢ⁻ |gᵢᵀx − lᵢ| / (1 + |½xᵀQx + cᵀx|)``.
    """
    lower, upper = P.finite_bounds()
    fl, fu = P.has_lower.to(x.dtype), P.has_upper.to(x.dtype)
    Qx, Ax, Gx, Atl, Gtm = mv(P.Q, x), mv(P.A, x), mv(P.G, x), mv(P.A.mT, lam), mv(P.G.mT, mu)
    eq = inf_norm(Ax - P.b) / (1 + torch.maximum(inf_norm(Ax), inf_norm(P.b)))
    viol = torch.maximum(fu * (Gx - upper), fl * (lower - Gx)).clamp_min(0)
    scale = torch.maximum(inf_norm(Gx), torch.maximum(inf_norm(fu * upper), inf_norm(fl * lower)))
    ineq = inf_norm(viol) / (1 + scale)
    mu_up, mu_lo = mu.clamp_min(0), (-mu).clamp_min(0)
    wrong_side = inf_norm((1 - fu) * mu_up + (1 - fl) * mu_lo)
    r_d = Qx + P.c + Atl + Gtm
    dual_scale = torch.maximum(torch.maximum(inf_norm(Qx), inf_norm(P.c)),
                               torch.maximum(inf_norm(Atl), inf_norm(Gtm)))
    dual = torch.maximum(inf_norm(r_d), wrong_side) / (1 + dual_scale)
    gap = (fu * mu_up * (upper - Gx).abs() + fl * mu_lo * (Gx - lower).abs()).sum(-1)
    obj = 0.5 * (x * Qx).sum(-1) + (P.c * x).sum(-1)
    return torch.maximum(torch.maximum(eq, ineq), torch.maximum(dual, gap / (1 + obj.abs())))


class ActiveSetKKT:
    """The derivative KKT matrix ``K`` of an active set (module docstring), factored once.

    It is factored on the equilibrated problem, ``K̃ = diag(σD, E_A, E_G) K diag(D, E_A/σ,
    E_G/σ)``: in the reduced order when the solver left the whitened system of a positive
    definite ``Q`` (one m × m Cholesky), else in the regularized primal order (n × n).

    Attributes:
        upper, lower: ``(B, m)`` the active sides.
        ok: ``(B,)`` the factorization succeeded.
        singular: ``(B,)`` ``K`` is singular (or nearly) for that sample: refinement did not
            reach the exact ``K`` on the last solve or on a generic right-hand side (a probe
            solved with the first solve; a consistent right-hand side, such as a cotangent
            on ``x`` alone with duplicated constraints, is solved exactly by a singular ``K``
            too, so its refinement alone cannot tell).
    """

    def __init__(self, problem: QPProblem, scaled: QPProblem, scaling: Scaling,
                 upper: Tensor, lower: Tensor, reg: float, system: ReducedQPKKT | None = None,
                 max_refine: int = 8):
        self.problem, self.scaled, self.scaling = problem, scaled, scaling
        self.upper, self.lower = upper, lower
        dtype = problem.c.dtype
        active = (upper | lower).to(dtype)
        self.active = active
        self.G_active = scaled.G * active.unsqueeze(-1)
        self.w = (1 - active) * scaling.E_G ** 2 / scaling.sigma.unsqueeze(-1)
        fac: ReducedQPKKTFactor | PrimalKKTFactor | None = (
            None if system is None else system.masked(upper | lower).factor(self.w, reg))
        if fac is None or not bool(fac.ok.all()):
            # the reduced order needs independent active rows (an LP-like vertex with a
            # tiny Q has dependent ones); the regularized primal order does not
            kkt = PrimalKKT(scaled.Q, scaled.A, self.G_active, rho=reg, delta=reg)
            fac = kkt.factor(self.w)
        self.fac = fac
        self.ok = fac.ok
        self.max_refine = max_refine
        self.tol = torch.finfo(dtype).eps ** 0.75
        self.data_norm = _data_norm(scaled)
        self.singular = torch.zeros_like(self.ok)
        self.structural: Tensor | None = None  # the probe's verdict, after the first solve

    def solve(self, r1: Tensor, r2: Tensor, r3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``K⁻¹ r`` in the problem's own units, refined against the exact ``K``, for
        right-hand sides ``(..., B, k)``; zero for samples whose factorization failed. The
        solve runs in the factorization's dtype and returns the right-hand sides'."""
        given, dtype = r1.dtype, self.problem.c.dtype
        if given != dtype:
            z1, z2, z3 = self.solve(r1.to(dtype), r2.to(dtype), r3.to(dtype))
            return z1.to(given), z2.to(given), z3.to(given)
        S = self.scaling
        sig = S.sigma.unsqueeze(-1)
        r: tuple[Tensor, ...] = (r1 * sig * S.D, r2 * S.E_A, r3 * S.E_G)
        shape = r[0].shape[:-1]
        probing = self.structural is None
        if probing:  # one generic right-hand side more, stacked: inconsistent iff K is singular
            r = tuple(torch.cat([ri.reshape(shape[:-1].numel(), *ri.shape[-2:]), pi.unsqueeze(0)])
                      for ri, pi in zip(r, self._probe(), strict=True))
        z: tuple[Tensor, ...] = self.fac.solve(*r)
        P = self.scaled
        threshold = self.tol * (_stacked_inf(r) + self.data_norm * _stacked_inf(z))
        best = torch.full_like(threshold, float("inf"))
        for step in range(self.max_refine + 1):
            res = tuple(ri - ki for ri, ki in
                        zip(r, kkt_product(P.Q, P.A, self.G_active, self.w, *z), strict=True))
            err = _stacked_inf(res)
            done = err <= threshold
            go = ~done & (err < 0.5 * best)  # samples whose K is singular stall: frozen
            if step == self.max_refine or not bool(go.any()):
                break
            best = torch.minimum(best, err)
            dz = self.fac.solve(*res)
            keep = go.unsqueeze(-1)
            z = tuple(zi + torch.where(keep, di, 0.0) for zi, di in zip(z, dz, strict=True))
        stuck = (~done).reshape(-1, done.shape[-1])
        if probing:
            self.structural = stuck[-1] & self.ok
            stuck = stuck[:-1]
            z = tuple(zi[:-1].reshape(*shape, zi.shape[-1]) for zi in z)
        self.singular = (stuck.any(0) | self.structural) & self.ok
        keep = self.ok.unsqueeze(-1)
        z = tuple(torch.where(keep, zi, 0.0) for zi in z)
        return z[0] * S.D, z[1] * S.E_A / sig, z[2] * S.E_G / sig

    def _probe(self) -> tuple[Tensor, Tensor, Tensor]:
        """A fixed pseudo-random right-hand side ``(B, n), (B, p), (B, m)`` (generic: it
        has a component outside the range of any singular ``K``)."""
        B, (n, p, m) = self.problem.batch, self.problem.sizes
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(B, n + p + m, generator=gen, dtype=self.problem.c.dtype)
        v = v.to(self.problem.c.device)
        return v[:, :n], v[:, n:n + p], v[:, n + p:]

    def polish(self) -> tuple[Tensor, Tensor, Tensor]:
        """The complementary point of this active set: ``K⁻¹ (−c; b; a⁺∘u + a⁻∘l)``."""
        P = self.problem
        lower, upper = P.finite_bounds()
        bound = torch.where(self.upper, upper, torch.where(self.lower, lower, 0.0))
        return self.solve(-P.c, P.b, bound)


def _stacked_inf(vectors: tuple[Tensor, ...]) -> Tensor:
    return torch.stack([inf_norm(v) for v in vectors]).amax(0)


def _data_norm(P: QPProblem) -> Tensor:
    return 1 + torch.stack([inf_norm(t.flatten(-2)) for t in (P.Q, P.A, P.G)]).amax(0)


def classify(scaled_mu: Tensor, scaled_su: Tensor, scaled_sl: Tensor, P: QPProblem):
    """``(upper, lower)`` active masks from the equilibrated multipliers and slacks."""
    upper = P.has_upper & (scaled_mu > 0) & (scaled_mu >= scaled_su)
    lower = P.has_lower & (scaled_mu < 0) & (-scaled_mu >= scaled_sl) & ~upper
    return upper, lower


def derivative_and_polish(problem: QPProblem, sol: QPSolution, slack_u: Tensor, slack_l: Tensor,
                          scaled: QPProblem, scaling: Scaling, system: ReducedQPKKT | None,
                          reg: float, tol: float, polish: bool = True) -> QPSolution:
    """Classify the active set of ``sol``, factor its derivative system, polish the point
    and return the solution with ``derivative`` set (module docstring).

    ``slack_u``, ``slack_l`` are the solver's slacks in the problem's units (``u − Gx``,
    ``Gx − l``; anything where a side is absent).

    A float32 solution (``InteriorPoint(dtype=None)``) gets its derivative system and its
    polishing in float64, as OSQP's: the regularized primal order factored in float32 was
    too inexact to refine against the exact ``K`` (gradients off by up to 7 % on strictly
    complementary problems whose exact float32 solve is good to 1e-6)."""
    if problem.c.dtype != torch.float64:
        wide = problem.to(torch.float64)
        sol64 = QPSolution(sol.x.double(), sol.lam.double(), sol.mu.double(), sol.status, sol.stats)
        return narrowed(problem, derivative_and_polish(
            wide, sol64, slack_u.double(), slack_l.double(), *wide.equilibrated(), None,
            torch.finfo(torch.float64).eps ** 0.6, tol, polish), tol)
    # the derivative system's regularization is at least ε^0.6, whatever the solver's own
    # (the dual order iterates at 1e-12 behind a floor on W; K has W = 0 on active rows, and a
    # tinier one hides a singular K from the probe and leaves its factorization to rounding)
    reg = max(reg, torch.finfo(problem.c.dtype).eps ** 0.6)
    E, sigma = scaling.E_G, scaling.sigma.unsqueeze(-1)
    first = classify(sol.mu * sigma / E, slack_u * E, slack_l * E, problem)
    upper, lower = first
    fac = ActiveSetKKT(problem, scaled, scaling, upper, lower, reg, system)
    x, lam, mu = sol.x, sol.lam, sol.mu
    status = sol.status.clone()
    usable = (status != QPStatus.INFEASIBLE) & (status != QPStatus.UNBOUNDED)
    if polish:
        (x, lam, mu), accepted, guess = _polished(fac, problem, sol, usable & fac.ok, tol)
        for _ in range(CORRECTIONS):
            retry = usable & fac.ok & ~accepted
            if not bool(retry.any()):
                break
            up2, lo2 = corrected(problem, scaling, *guess, upper, lower)
            changed = retry & ((up2 != upper) | (lo2 != lower)).any(-1)
            if not bool(changed.any()):
                break
            upper = torch.where(changed.unsqueeze(-1), up2, upper)
            lower = torch.where(changed.unsqueeze(-1), lo2, lower)
            fac = ActiveSetKKT(problem, scaled, scaling, upper, lower, reg, system)
            point, taken, guess = _polished(fac, problem, sol, changed & usable & fac.ok, tol)
            keep = taken.unsqueeze(-1)
            x, lam, mu = (torch.where(keep, a, b) for a, b in zip(point, (x, lam, mu), strict=True))
            accepted = accepted | taken
        moved = ((upper != first[0]) | (lower != first[1])).any(-1) & ~accepted
        if bool(moved.any()):  # corrected in vain: back to the solver's own active set
            upper = torch.where(moved.unsqueeze(-1), first[0], upper)
            lower = torch.where(moved.unsqueeze(-1), first[1], lower)
            fac = ActiveSetKKT(problem, scaled, scaling, upper, lower, reg, system)
        status = torch.where(accepted, QPStatus.SOLVED, status)
    # μ = 0 off the active set (exact complementarity) unless that breaks the test a solver's
    # unpolished point passed with its own multipliers (the layer's residual masks them out)
    residual = optimality_residual(problem, x, lam, mu)
    zeroed = torch.where(upper | lower, mu, 0.0)
    zeroed_residual = optimality_residual(problem, x, lam, zeroed)
    take = zeroed_residual <= torch.clamp(residual, min=tol)
    mu = torch.where(take.unsqueeze(-1), zeroed, mu)
    residual = torch.where(take, zeroed_residual, residual)
    # SOLVED means the final point meets the test: one that stopped at its iteration cap
    # (OSQP on a QP whose x is not unique) may pass it; and a sample without a derivative
    # system is no solved sample (it would get zero gradients)
    meets = residual <= tol
    status = torch.where((status == QPStatus.SOLVED) & ~meets, QPStatus.MAX_ITER, status)
    status = torch.where((status == QPStatus.MAX_ITER) & meets, QPStatus.SOLVED, status)
    status = torch.where((status == QPStatus.SOLVED) & ~fac.ok, QPStatus.NUMERICAL, status)
    solved = _record_status(sol.stats, status)
    sol.stats.residual = torch.where(solved, residual, sol.stats.residual)
    weak = _weakly_active(problem, x, mu, upper, lower, scaling, tol)
    sol.stats.extra["degenerate"] = (weak | fac.singular) & solved
    fac.ok = fac.ok & solved
    return QPSolution(x, lam, mu, status, sol.stats, fac)


def narrowed(problem: QPProblem, sol: QPSolution, tol: float) -> QPSolution:
    """``sol``, computed in a wider dtype than ``problem``'s, rounded to it. A ``SOLVED``
    sample whose rounded point fails the test at ``tol`` becomes ``NUMERICAL``: the answer
    is not representable in the narrow dtype (e.g. data scaled 1e30 apart, where the
    multipliers cancel beyond float32's precision); the status promises the returned point."""
    wide, dtype = sol.x.dtype, problem.c.dtype
    out = sol.to(dtype)
    if wide == dtype:
        return out
    res = optimality_residual(problem.to(wide), *(t.to(wide) for t in (out.x, out.lam, out.mu)))
    bad = (out.status == QPStatus.SOLVED) & ~(res <= tol)
    if bool(bad.any()):
        out.status = torch.where(bad, QPStatus.NUMERICAL, out.status)
        _record_status(out.stats, out.status)
        out.stats.residual = torch.where(bad, res.to(out.stats.residual.dtype), out.stats.residual)
        if out.derivative is not None:
            out.derivative.ok = out.derivative.ok & ~bad
    return out


def _record_status(stats, status: Tensor) -> Tensor:
    """Write the per-sample ``status`` into the solve's stats; returns the SOLVED mask."""
    solved = status == QPStatus.SOLVED
    stats.converged = solved
    stats.extra["status"] = status
    return solved


#: primal-dual active-set corrections tried when polishing the solver's active set fails
CORRECTIONS = 3


def _polished(fac: ActiveSetKKT, problem: QPProblem, sol: QPSolution, usable: Tensor, tol: float
              ) -> tuple[tuple[Tensor, ...], Tensor, tuple[Tensor, Tensor]]:
    """``((x, λ, μ), accepted, (x_p, μ_p))``: the solver's point with the polished one in
    the ``usable`` samples where it is optimal, which of them, and the plain polished point
    (for :func:`corrected`)."""
    upper, lower = fac.upper, fac.lower
    x, lam, mu = sol.x, sol.lam, sol.mu
    xp, lp, mp = fac.polish()
    # a loose tol must not admit a wrong active set: the polished point is kept only if
    # it is optimal to about the square root of the working precision
    strict = min(tol, torch.finfo(x.dtype).eps ** 0.5)
    (x, lam, mu), accepted = _accept(problem, (xp, lp, mp), (x, lam, mu), usable, fac, strict)
    todo = usable & ~accepted
    if bool(todo.any()):
        # where the active constraints are dependent the polished multipliers are one point
        # of a non-unique set and may have wrong signs; the second candidate is the solver's
        # own (sign-correct) multipliers, moved onto that set by one more solve with K
        mu_a = torch.where(upper | lower, sol.mu, 0.0)
        r_d = mv(problem.Q, xp) + problem.c + mv(problem.A.mT, sol.lam) + mv(problem.G.mT, mu_a)
        dx, dl, dm = fac.solve(-r_d, torch.zeros_like(lam), torch.zeros_like(mu))
        (x, lam, mu), second = _accept(problem, (xp + dx, sol.lam + dl, mu_a + dm), (x, lam, mu),
                                       todo, fac, strict)
        accepted = accepted | second
    return (x, lam, mu), accepted, (xp, mp)


def _accept(problem: QPProblem, candidate: tuple[Tensor, Tensor, Tensor],
            current: tuple[Tensor, Tensor, Tensor], eligible: Tensor, fac: ActiveSetKKT,
            tol: float) -> tuple[tuple[Tensor, ...], Tensor]:
    """``current`` replaced by ``candidate`` where it is optimal to ``tol`` with multipliers
    of the right signs on ``fac``'s active sides (wrong-signed ones within ``tol`` of 0 are
    set to 0 and must pass the test so); also returns where it was."""
    xc, lc, mc = candidate
    # signs up to round-off: a weakly active constraint's multiplier is 0 up to ±ε‖μ‖ (with
    # a non-unique x, as cvxpy's epigraph variables, only that set may reach the solution)
    slack = (tol * (1 + inf_norm(mc))).unsqueeze(-1)
    signed = torch.where(fac.upper, mc.clamp_min(0), torch.where(fac.lower, mc.clamp_max(0), mc))
    right_sign = ((signed - mc).abs() <= slack).all(-1)
    res = optimality_residual(problem, xc, lc, signed)
    accept = eligible & right_sign & (res <= tol) & torch.isfinite(res)
    keep = accept.unsqueeze(-1)
    point = tuple(torch.where(keep, c, o) for c, o in zip((xc, lc, signed), current, strict=True))
    return point, accept


def corrected(P: QPProblem, scaling: Scaling, x: Tensor, mu: Tensor, upper: Tensor,
              lower: Tensor) -> tuple[Tensor, Tensor]:
    """One primal-dual active-set update (Hintermüller, Ito & Kunisch 2002) from the polished
    point of ``(upper, lower)``: a side is active where ``μ̃ + (G̃x − ũ) > 0`` (upper) or
    ``−μ̃ + (l̃ − G̃x) > 0`` (lower), in the equilibrated units: constraints with a
    wrong-signed multiplier leave the set, violated ones join it. (An interior point stops
    with an active constraint's slack near τ/μ*: one with a small multiplier μ* can look
    inactive there.)"""
    E, sigma = scaling.E_G, scaling.sigma.unsqueeze(-1)
    lo, hi = P.finite_bounds()
    Gx = mv(P.G, x)
    mu_s = mu * sigma / E
    up = P.has_upper & (mu_s + E * (Gx - hi) > 0)
    down = P.has_lower & (-mu_s + E * (lo - Gx) > 0) & ~up
    return up, down


def _weakly_active(P: QPProblem, x: Tensor, mu: Tensor, upper: Tensor, lower: Tensor,
                   scaling: Scaling, tol: float) -> Tensor:
    """Samples with an active constraint whose multiplier vanishes, or an inactive one with
    zero slack (strict complementarity fails: the solution map has a kink there)."""
    E, sigma = scaling.E_G, scaling.sigma.unsqueeze(-1)
    lo, hi = P.finite_bounds()
    Gx = mv(P.G, x)
    thresh = max(10 * torch.finfo(x.dtype).eps ** 0.5, tol)
    z = (mu * sigma / E).abs()
    su, sl = (hi - Gx) * E, (Gx - lo) * E
    active = upper | lower
    tight = (P.has_upper & (su.abs() <= thresh)) | (P.has_lower & (sl.abs() <= thresh))
    return ((active & (z <= thresh)) | (~active & tight)).any(-1)
