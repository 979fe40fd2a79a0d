"""Batched primal-dual interior point (Mehrotra predictor-corrector) for convex QPs.

    min_x ½ xᵀQx + cᵀx   s.t.  Ax = b,   l ≤ Gx ≤ u

Two-sided constraints are native: row ``i`` has slacks ``s⁺ = u − Gx``, ``s⁻ = Gx − l`` and
multipliers ``z⁺, z⁻ ≥ 0`` for its finite sides, ``μ = z⁺ − z⁻``. Eliminating the slacks and
the two multipliers of each row leaves the Newton system

    [ Q   Aᵀ  Gᵀ ] [dx]   [ −r_d ]       r_d = Qx + c + Aᵀλ + Gᵀμ,  r_e = Ax − b,
    [ A   0   0  ] [dλ] = [ −r_e ]       W⁻¹ = z⁺/s⁺ + z⁻/s⁻,
    [ G   0  −W  ] [dμ]   [ −Wρ  ]       ρ = (z⁺r⁺ − r_c⁺)/s⁺ − (z⁻r⁻ − r_c⁻)/s⁻,

with ``r⁺ = Gx + s⁺ − u``, ``r⁻ = l + s⁻ − Gx`` and the complementarity residuals
``r_c^± = s^± z^± − σ τ``; then ``ds⁺ = −r⁺ − G dx``, ``ds⁻ = G dx − r⁻``,
``dz^± = (z^± r^± − r_c^± ± z^± G dx)/s^±``. So a two-sided row costs what a one-sided one
does: one row of ``G`` and one diagonal entry of ``W`` (stacking ``[G; −G]`` would double m).
The matrix is factored in one of two orders (:mod:`implicit_layers.solvers.qp.views`).

The iteration runs on the equilibrated problem (:meth:`QPProblem.equilibrated`); every
quantity of the stopping test is mapped back to the user's problem first. A sample is
``SOLVED`` when, in the original problem,

* ``‖Ax − b‖∞ ≤ tol·(1 + max(‖Ax‖∞, ‖b‖∞))`` and every finite bound holds up to
  ``tol·(1 + max(‖Gx‖∞, |finite bounds|∞))`` (through the slack residuals ``r^±``);
* ``‖Qx + c + Aᵀλ + Gᵀμ‖∞ ≤ tol·(1 + max(‖Qx‖∞, ‖c‖∞, ‖Aᵀλ‖∞, ‖Gᵀμ‖∞))``;
* the duality gap ``Σ s⁺z⁺ + s⁻z⁻ ≤ tol·(1 + |½xᵀQx + cᵀx|)``.

Afterwards the solution is *polished* (:mod:`implicit_layers.solvers.qp.active_set`): the
active set it identifies is solved exactly, which makes the point complementary to working
precision, and kept if it is optimal (the test above is then checked again on it). The same
factorization is the one the layer's backward and JVP reuse.

Other outcomes: ``INFEASIBLE`` (the multipliers approach a Farkas certificate
``Aᵀλ + Gᵀμ ≈ 0``, ``bᵀλ + uᵀz⁺ − lᵀz⁻ < 0``), ``UNBOUNDED`` (``x`` approaches a ray ``d`` with
``Qd ≈ 0``, ``Ad ≈ 0``, ``Gd`` within the recession cone, ``cᵀd < 0``), ``MAX_ITER``, or
``NUMERICAL`` (a factorization failed or an iterate became non-finite). Torch ops only (CPU
and CUDA); samples stop independently and only the running ones are stepped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.checks import check_count, check_positive
from implicit_layers.solvers.qp.active_set import derivative_and_polish
from implicit_layers.solvers.qp.base import QPSolution, QPSolver, QPStatus
from implicit_layers.solvers.qp.feasibility import mark_infeasible
from implicit_layers.solvers.qp.problem import QPProblem, Scaling, inf_norm
from implicit_layers.solvers.qp.views import is_whitened, make_view
from implicit_layers.stats import SolverStats

RUNNING = -1


class InteriorPoint(QPSolver):
    """Batched Mehrotra predictor-corrector interior point for dense convex QPs.

    Args:
        tol: the stopping tolerance of the test in the module docstring (default ``1e-9`` in
            float64, ``1e-5`` in float32); polishing then usually reaches working precision.
        max_iter: iteration cap; samples still running get ``MAX_ITER``.
        reg: regularization of the Newton systems on the equilibrated problem (default
            ``1e-9`` in float64, ``1e-5`` in float32): it makes LPs, singular ``Q`` and
            dependent equality rows solvable and only perturbs search directions.
        infeasibility_tol: tolerance of the infeasibility/unboundedness certificates
            (default ``1e-8`` float64, ``1e-4`` float32).
        kkt_form: ``"primal"`` factors ``Q + ρI + AᵀA/δ + Gᵀ(W + δI)⁻¹G`` (n × n, any positive
            semidefinite ``Q``); ``"dual"`` (positive definite, well-conditioned ``Q``) iterates
            in whitened coordinates and factors the m × m ``G Z Gᵀ + W`` whose ``G Z Gᵀ`` is
            computed once; it falls back to ``"primal"`` for a batch whose ``Q`` is singular or
            ill-conditioned. ``"auto"`` (default): ``"dual"`` where it costs fewer flops.
        polish: solve the identified active set exactly after the iterations (default True).
        dtype: the dtype of the computation (default float64): float32 inputs are solved in
            float64 and the results returned in float32 (an interior point's late iterations
            and the derivative system need the range and precision; the cost on a CPU is about
            1.5–2× a float32 solve). ``None`` computes in the inputs' dtype.

    >>> import torch
    >>> import implicit_layers as il
    >>> Q = torch.eye(2, dtype=torch.float64)
    >>> c = torch.tensor([-1., -1.], dtype=torch.float64)
    >>> G, h = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    >>> x, lam, mu = il.QPLayer(solver=il.InteriorPoint(kkt_form="primal"))(Q, c, None, None, G, h)
    >>> x, mu
    (tensor([0.5000, 0.5000], dtype=torch.float64), tensor([0.5000], dtype=torch.float64))
    """

    name = "InteriorPoint"

    def __init__(self, tol: float | None = None, max_iter: int = 50, reg: float | None = None,
                 infeasibility_tol: float | None = None, kkt_form: str = "auto",
                 polish: bool = True, dtype: torch.dtype | None = torch.float64):
        check_count("max_iter", max_iter)
        check_positive("tol", tol)
        check_positive("reg", reg)
        check_positive("infeasibility_tol", infeasibility_tol)
        if kkt_form not in ("auto", "primal", "dual"):
            raise ValueError(f"kkt_form must be 'auto', 'primal' or 'dual', got {kkt_form!r}")
        self.tol, self.max_iter, self.reg = tol, max_iter, reg
        self.infeasibility_tol, self.kkt_form, self.polish = infeasibility_tol, kkt_form, polish
        if dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32, torch.float64 or None, got {dtype!r}")
        self.dtype = dtype

    def defaults(self, dtype: torch.dtype, dual: bool) -> tuple[float, float, float, float]:
        """``(tol, reg, infeasibility_tol, w_min)`` for this dtype and KKT order.

        ``w_min`` bounds ``W = s/z`` below in the Newton systems (a modified Newton step on
        the nearly active constraints): the primal order's ``Gᵀ W⁻¹ G`` must stay factorable
        in the dtype (``W⁻¹ ≤ 1e10``, float32 ``ε^-½``); the dual order's ``G Z Gᵀ + W`` only
        grows better conditioned as ``W`` shrinks, and a floor there would keep the
        directions of the active constraints from converging (1e-10 in both dtypes). The
        regularization follows the same split: ``ε^0.6`` of the dtype for the primal order's
        ``Q`` and equality blocks, 1e-9 on the dual order's ``m × m`` system."""
        f64 = dtype == torch.float64
        eps = torch.finfo(dtype).eps
        reg = self.reg if self.reg is not None else (1e-9 if dual else eps ** 0.6)
        w_min = 1e-10 if f64 or dual else eps ** 0.5
        return (self.tol if self.tol is not None else (1e-9 if f64 else 1e-5), reg,
                self.infeasibility_tol if self.infeasibility_tol is not None else (1e-8 if f64 else 1e-4),
                w_min)

    def _use_dual(self, n: int, p: int, m: int) -> bool:
        """Whether to try the reduced (dual) order: asked for, or cheaper per iteration."""
        if self.kkt_form != "auto":
            return self.kkt_form == "dual"
        return m > 0 and m ** 3 / 3 < 2 * n * n * m + n ** 3 / 3 + n * n * p

    def solve(self, problem: QPProblem, detect_infeasibility: bool = True,
              tol_dtype: torch.dtype | None = None) -> QPSolution:
        """Solve ``problem``; ``tol_dtype``: the dtype whose default tolerances apply (the
        caller's, when the computation is upcast)."""
        given = problem.c.dtype
        if self.dtype is not None and self.dtype != given:
            return self.solve(problem.to(self.dtype), detect_infeasibility, given).to(given)
        B, (n, p, m) = problem.batch, problem.sizes
        dtype, device = problem.c.dtype, problem.c.device
        if B == 0:  # an empty batch: empty outputs (and gradients), nothing to solve
            none = torch.zeros(0, dtype=torch.int64, device=device)
            stats = SolverStats(self.name, none, problem.c.new_zeros(0), none.bool(), evaluations=0)
            stats.extra["status"] = none
            return QPSolution(problem.c.new_zeros(0, n), problem.c.new_zeros(0, p),
                              problem.c.new_zeros(0, m), none, stats)
        scaled, scaling = problem.equilibrated()
        view = make_view(scaled, self._use_dual(n, p, m), self.defaults(dtype, False)[1])
        _, reg, _, w_min = self.defaults(dtype, is_whitened(view))
        tol, _, inf_tol, _ = self.defaults(tol_dtype or dtype, is_whitened(view))
        state = _initial_point(view, scaled, reg)
        status = torch.full((B,), RUNNING, dtype=torch.int64, device=device)
        iters = torch.zeros(B, dtype=torch.int64, device=device)
        residual = torch.full((B,), float("inf"), dtype=dtype, device=device)
        last_step = torch.ones(B, dtype=dtype, device=device)
        last_step2 = torch.ones(B, dtype=dtype, device=device)  # the step before
        for k in range(self.max_iter + 1):
            idx = (status == RUNNING).nonzero().squeeze(-1)
            if idx.numel() == 0:
                break
            everyone = idx.numel() == B
            sub = view if everyone else view.select(idx)
            subscale = scaling if everyone else scaling.select(idx)
            st = state if everyone else state.select(idx)
            res, parts = _residuals(sub, subscale, st)
            jammed = (last_step if everyone else last_step.index_select(0, idx)) < 1e-8
            new = _classify(sub, st, res, parts, jammed, tol, inf_tol, k == self.max_iter)
            # a step below 1e-10 of the way twice in a row: stalled (polishing may finish it)
            stalled = jammed & ((last_step2 if everyone else last_step2.index_select(0, idx)) < 1e-10) \
                & (new == RUNNING)
            new = torch.where(stalled, QPStatus.MAX_ITER, new)
            if everyone:
                status.copy_(new), iters.fill_(k), residual.copy_(res)
            else:
                status[idx], iters[idx], residual[idx] = new, k, res
            go = new == RUNNING
            if not bool(go.any()):
                continue
            step, alpha, ok = _step(sub, st, parts, res, reg, tol, w_min)
            status[idx[~ok & go]] = QPStatus.NUMERICAL
            state.advance_(idx if not everyone else None, step, torch.where(ok & go, alpha, 0.0))
            last_step2.index_copy_(0, idx, last_step.index_select(0, idx))
            last_step.index_copy_(0, idx, alpha)
        x, lam, mu = scaling.unscale(view.to_original(state.x), state.lam, state.zu - state.zl)
        slack_u, slack_l = state.su / scaling.E_G, state.sl / scaling.E_G
        solved = status == QPStatus.SOLVED
        stats = SolverStats(self.name, iters, residual, solved, evaluations=int(iters.max()) + 1)
        stats.extra["status"] = status
        sol = QPSolution(x, lam, mu, status, stats)
        system = view.system if is_whitened(view) else None
        sol = derivative_and_polish(problem, sol, slack_u, slack_l, scaled, scaling, system,
                                    reg, tol, polish=self.polish)
        if detect_infeasibility:
            mark_infeasible(self, problem, sol.status, tol)
        return sol


class _State:
    """The iterate in the iteration's coordinates: ``x, λ`` and, per row, ``z⁺, z⁻, s⁺, s⁻``
    (absent sides hold ``z = 0, s = 1`` and never move)."""

    def __init__(self, x, lam, zu, zl, su, sl):
        self.x, self.lam, self.zu, self.zl, self.su, self.sl = x, lam, zu, zl, su, sl

    def tensors(self):
        return (self.x, self.lam, self.zu, self.zl, self.su, self.sl)

    def select(self, idx: Tensor) -> _State:
        return _State(*(t.index_select(0, idx) for t in self.tensors()))

    def advance_(self, idx: Tensor | None, step, alpha: Tensor) -> None:
        """``v ← v + α dv`` for every variable, in place (``idx``: the rows of the batch)."""
        a = alpha.unsqueeze(-1)
        for v, dv in zip(self.tensors(), step, strict=True):
            if idx is None:
                v.add_(a * dv)
            else:
                v.index_add_(0, idx, a * dv)


def _initial_point(view, P: QPProblem, reg: float) -> _State:
    """Solve the KKT system with ``W = I`` and ``Gx`` pulled towards the middle of the bounds,
    then shift slacks and multipliers into the interior and take their geometric mean for
    both (``s = z``): a well-centred start."""
    lower, upper = P.finite_bounds()
    fl, fu = P.has_lower.to(lower.dtype), P.has_upper.to(lower.dtype)
    both = fl * fu
    target = both * (lower + upper) / 2 + (1 - both) * (fu * upper + fl * lower)
    fac = view.factor(torch.ones_like(target), reg)
    x, lam, mu, Gx = fac.solve_and_product(-view.c, P.b, target)

    def shift(v: Tensor, mask: Tensor) -> Tensor:  # positive, preserving differences
        if v.shape[-1] == 0:  # no inequality rows (an equality-only QP)
            return v
        worst = torch.where(mask > 0, -v, torch.full_like(v, -float("inf"))).amax(-1, keepdim=True)
        worst = torch.where(torch.isfinite(worst), worst, torch.zeros_like(worst))
        return torch.where(worst >= 0, v + 1 + worst, v)

    su = shift(upper - Gx, fu)
    sl = shift(Gx - lower, fl)
    zu, zl = shift(mu, fu), shift(-mu, fl)
    su = zu = torch.where(fu > 0, (su * zu).sqrt(), 1.0)
    sl = zl = torch.where(fl > 0, (sl * zl).sqrt(), 1.0)
    return _State(x, lam, zu * fu, zl * fl, su.clone(), sl.clone())


def _residuals(view, scaling: Scaling, st: _State):
    """The scaled stopping measure of each sample and the residual vectors the step needs.

    The measures are those of the original problem, obtained by undoing the equilibration
    on each term (``r_d = D⁻¹ r̃_d / σ``, ``r_e = E_A⁻¹ r̃_e``, ...)."""
    P = view.problem
    lower, upper = P.finite_bounds()
    fl, fu = P.has_lower.to(lower.dtype), P.has_upper.to(lower.dtype)
    mu = st.zu - st.zl
    Qx, Ax, Gx, Atl, Gtm = view.products(st.x, st.lam, mu)
    r_d = Qx + view.c + Atl + Gtm
    r_e = Ax - P.b
    r_u = fu * (Gx + st.su - upper)
    r_l = fl * (lower + st.sl - Gx)
    gap = (fu * st.zu * st.su + fl * st.zl * st.sl).sum(-1)
    obj = 0.5 * (st.x * Qx).sum(-1) + (view.c * st.x).sum(-1)
    # the original problem's terms
    sigma, Dinv = scaling.sigma, scaling.D.reciprocal()
    r_d0, Qx0, Atl0, Gtm0 = (Dinv * v / sigma[:, None] for v in view.original(r_d, Qx, Atl, Gtm))
    c0 = Dinv * P.c / sigma[:, None]
    EA, EG = scaling.E_A, scaling.E_G
    eq = inf_norm(r_e / EA) / (1 + torch.maximum(inf_norm(Ax / EA), inf_norm(P.b / EA)))
    bound_scale = torch.maximum(inf_norm(Gx / EG), torch.maximum(inf_norm(fu * upper / EG),
                                                                 inf_norm(fl * lower / EG)))
    ineq = torch.maximum(inf_norm(r_u / EG), inf_norm(r_l / EG)) / (1 + bound_scale)
    dual = inf_norm(r_d0) / (1 + torch.maximum(torch.maximum(inf_norm(Qx0), inf_norm(c0)),
                                               torch.maximum(inf_norm(Atl0), inf_norm(Gtm0))))
    gap_rel = (gap / sigma) / (1 + (obj / sigma).abs())
    res = torch.maximum(torch.maximum(eq, ineq), torch.maximum(dual, gap_rel))
    # non-finite anywhere (x, λ, z, s) reaches res through these terms
    parts = dict(r_d=r_d, r_e=r_e, r_u=r_u, r_l=r_l, gap=gap, fu=fu, fl=fl, Qx=Qx, Ax=Ax, Gx=Gx,
                 Aty=Atl + Gtm, lower=lower, upper=upper, gap_scale=sigma + obj.abs())
    return res, parts


def _classify(view, st: _State, res, parts, jammed, tol, inf_tol, last: bool) -> Tensor:
    """The new status of each running sample (``RUNNING`` if it goes on).

    Certificates are tested on the equilibrated problem (they are invariant to the scaling
    up to the direction's scale). Jammed samples (the last step was < 1e-8 of the way: an
    infeasible start stuck at a complementary point while the certificate forms) accept them
    at the looser ``√inf_tol`` instead of burning the remaining iterations."""
    P = view.problem
    fu, fl, lower, upper = parts["fu"], parts["fl"], parts["lower"], parts["upper"]
    certificate_tol = torch.where(jammed, inf_tol ** 0.5, inf_tol)
    tiny = torch.finfo(res.dtype).tiny
    new = torch.full(res.shape, RUNNING, dtype=torch.int64, device=res.device)
    scale = 1 + torch.stack([inf_norm(t.flatten(1)) for t in (P.Q, P.A, P.G)]).amax(0)
    if view.may_be_unbounded:  # x/‖x‖∞ → a ray d with Qd ≈ 0, Ad ≈ 0, Gd in the recession cone
        nx = inf_norm(st.x).clamp_min(tiny)
        Gx = parts["Gx"]
        cone = torch.maximum(inf_norm(fu * Gx.clamp_min(0)), inf_norm(fl * (-Gx).clamp_min(0)))
        flat = torch.maximum(torch.maximum(inf_norm(parts["Qx"]), inf_norm(parts["Ax"])), cone)
        descent = (view.c * st.x).sum(-1) < -inf_tol ** 0.5 * (1 + inf_norm(view.c)) * nx
        new = torch.where((flat <= certificate_tol * scale * nx) & descent, QPStatus.UNBOUNDED, new)
    # infeasible (Farkas): (λ, z⁺, z⁻)/ν → a certificate with Aᵀλ + Gᵀμ ≈ 0, dual value < 0
    nu = torch.maximum(inf_norm(st.lam), torch.maximum(inf_norm(st.zu), inf_norm(st.zl))).clamp_min(tiny)
    value = (P.b * st.lam).sum(-1) + (fu * upper * st.zu).sum(-1) - (fl * lower * st.zl).sum(-1)
    d_scale = 1 + torch.maximum(inf_norm(P.b), torch.maximum(inf_norm(fu * upper), inf_norm(fl * lower)))
    infeasible = (inf_norm(parts["Aty"]) <= certificate_tol * scale * nu) & (
        value < -inf_tol ** 0.5 * d_scale * nu)
    new = torch.where(infeasible, QPStatus.INFEASIBLE, new)
    new = torch.where(res <= tol, QPStatus.SOLVED, new)
    new = torch.where(torch.isfinite(res), new, QPStatus.NUMERICAL)
    return torch.where(new == RUNNING, QPStatus.MAX_ITER, new) if last else new


def _residual(Mz, r) -> tuple[Tensor, ...]:
    return tuple(ri - mi for ri, mi in zip(r, Mz, strict=True))


def _norm(vectors) -> Tensor:
    return torch.stack([inf_norm(v) for v in vectors]).amax(0)


def _max_step(pairs, masks) -> Tensor:
    """Largest ``α ≤ 1`` keeping every ``v + α dv > 0`` (``v > 0``) on the masked rows:
    ``1 / max(1, −min dv/v)``."""
    worst = None
    for (v, dv), mask in zip(pairs, masks, strict=True):
        if v.shape[-1] == 0:
            continue
        r = torch.where(mask > 0, dv / v, torch.zeros((), dtype=v.dtype, device=v.device)).amin(-1)
        worst = r if worst is None else torch.minimum(worst, r)
    if worst is None:
        return pairs[0][0].new_ones(pairs[0][0].shape[0])
    return (-worst).clamp_min(1.0).reciprocal()


def _step(view, st: _State, parts, res: Tensor, reg: float, tol: float, w_min: float):
    """One Mehrotra predictor-corrector direction, its step length and the per-sample ``ok``
    of the factorization (module docstring). Both directions solve the Newton system; they
    differ only in ``r_c``, so the corrector is the predictor plus one solve with
    ``(0, 0, −W Δρ)``. The centering target ``στ`` is kept above a tenth of the gap the
    stopping test needs: driving the slacks of active constraints far below it (to round-off,
    where ``W ≪ δ``) only degrades the directions; polishing finishes the job exactly."""
    fu, fl = parts["fu"], parts["fl"]
    r_u, r_l = parts["r_u"], parts["r_l"]
    zu, zl, su, sl = st.zu, st.zl, st.su, st.sl
    D = fu * zu / su + fl * zl / sl
    W = D.reciprocal().clamp_min(w_min)
    fac = view.factor(W, reg)

    def solve(r1, r2, r3):
        """``M⁻¹ r`` with one step of refinement against the unregularized ``M``: the
        regularization δ dominates ``W`` on the active constraints near the solution. The
        step is kept only where it reduces the residual (where ``M`` is singular, e.g. more
        active constraints than unknowns, refinement would amplify its null space by 1/δ)."""
        z = fac.solve_and_product(r1, r2, r3)
        res0 = _residual(view.kkt_product(W, *z[:3]), (r1, r2, r3))
        d = fac.solve_and_product(*res0)
        z1 = tuple(zi + di for zi, di in zip(z, d))
        better = _norm(_residual(view.kkt_product(W, *z1[:3]), (r1, r2, r3))) < _norm(res0)
        keep = better.unsqueeze(-1)
        return tuple(torch.where(keep, a, b) for a, b in zip(z1, z))

    def direction(rc_u, rc_l, with_residuals: bool):
        rho = fu * (zu * r_u - rc_u) / su - fl * (zl * r_l - rc_l) / sl if with_residuals else \
            -fu * rc_u / su + fl * rc_l / sl
        if with_residuals:
            return solve(-parts["r_d"], -parts["r_e"], -W * rho)
        zero = parts["r_d"].new_zeros(())
        return solve(zero.expand_as(parts["r_d"]), zero.expand_as(parts["r_e"]), -W * rho)

    share_u = fu * zu / su / (fu * zu / su + fl * zl / sl)  # each side's part of W⁻¹

    def slacks_and_duals(Gdx, dmu, rc_u, rc_l, with_residuals: bool):
        """``ds^±`` from ``G dx`` and ``dz^±`` from the complementarity rows, then ``dz⁺ − dz⁻``
        matched to the solve's ``dμ``, which keeps ``r_d`` linear: the floor ``w_min`` makes
        the solve's ``dμ`` differ from ``W_true⁻¹ G dx + ρ``; the difference is split over the
        two sides in proportion to their share of ``W⁻¹`` (all of it on one-sided rows)."""
        ru, rl = (r_u, r_l) if with_residuals else (0.0, 0.0)
        dsu, dsl = fu * (-ru - Gdx), fl * (Gdx - rl)
        dzu = fu * (-rc_u - zu * dsu) / su
        dzl = fl * (-rc_l - zl * dsl) / sl
        gap = dmu - (dzu - dzl)
        return dzu + fu * share_u * gap, dzl - fl * (1 - share_u) * gap, dsu, dsl

    rc_u, rc_l = fu * zu * su, fl * zl * sl  # predictor: σ = 0
    dx, dl, dmu, Gdx = direction(rc_u, rc_l, True)
    dzu, dzl, dsu, dsl = slacks_and_duals(Gdx, dmu, rc_u, rc_l, True)
    count = (fu + fl).sum(-1).clamp_min(1)
    masks = (fu, fu, fl, fl)
    a_aff = _max_step(((su, dsu), (zu, dzu), (sl, dsl), (zl, dzl)), masks)
    tau = parts["gap"] / count

    def complementarity(alpha: Tensor) -> Tensor:
        """The mean complementarity after a step of ``alpha`` along the current direction."""
        a = alpha.unsqueeze(-1)
        return (fu * (su + a * dsu) * (zu + a * dzu) + fl * (sl + a * dsl) * (zl + a * dzl)).sum(-1) / count

    tau_aff = complementarity(a_aff)
    sigma = (tau_aff / tau.clamp_min(torch.finfo(tau.dtype).tiny)).clamp(0, 1) ** 3
    floor = 0.1 * tol * parts["gap_scale"] / count
    target = torch.maximum(sigma * tau, floor).unsqueeze(-1)
    # the second-order term weighted by √a_aff (a safeguarded Mehrotra corrector): where the
    # affine direction is blocked early (a_aff ≪ 1, as on degenerate problems) its full
    # weight made the steps cycle, the gap growing every other iteration
    a = a_aff.sqrt().unsqueeze(-1)
    drc_u, drc_l = fu * (a * dsu * dzu - target), fl * (a * dsl * dzl - target)
    cx, cl, cmu, Gcx = direction(drc_u, drc_l, False)
    czu, czl, csu, csl = slacks_and_duals(Gcx, cmu, drc_u, drc_l, False)
    dx, dl = dx + cx, dl + cl
    dzu, dzl, dsu, dsl = dzu + czu, dzl + czl, dsu + csu, dsl + csl
    eta = 1 - res.clamp(1e-4, 0.01)
    alpha = eta * _max_step(((su, dsu), (zu, dzu), (sl, dsl), (zl, dzl)), masks)
    # once the iterate is nearly feasible (residuals below the mean complementarity), back
    # off (halving, at most 6 times) while the step would raise the mean complementarity: on
    # degenerate problems a nearly singular system can give a long direction whose
    # second-order term α² ds∘dz outweighs the decrease, and the iterates then cycle
    infeasibility = torch.stack([inf_norm(parts[k]) for k in ("r_d", "r_e", "r_u", "r_l")]).amax(0)
    settled = infeasibility <= tau
    for _ in range(6):
        worse = settled & (complementarity(alpha) > tau)
        if not bool(worse.any()):
            break
        alpha = torch.where(worse, alpha / 2, alpha)
    ok = fac.ok & torch.isfinite(alpha)
    return (dx, dl, dzu, dzl, dsu, dsl), torch.where(ok, alpha, 0.0), ok
