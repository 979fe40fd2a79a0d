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
* ``‖Qx + c + Aᵀλ + Gᵀμ‖∞ ≤ tol·(1 + max(‖Qx‖∞, ‖c‖∞, ‖Aᵀλ + Gᵀμ‖∞))``;
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
from implicit_layers.solvers.qp.active_set import derivative_and_polish, narrowed
from implicit_layers.solvers.qp.base import QPSolution, QPSolver, QPStatus
from implicit_layers.solvers.qp.feasibility import mark_infeasible
from implicit_layers.solvers.qp.iterate import Sides, State, initial_point
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
        reg: regularization of the Newton systems on the equilibrated problem (default: see
            :meth:`defaults`): it makes LPs, singular ``Q`` and dependent equality rows solvable
            and only perturbs search directions.
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
        ``Q`` and equality blocks (refined away in every solve), 1e-12 on the dual order's
        ``m × m`` system, where the floor ``w_min`` already keeps it positive definite (its
        directions are then exact for the floored ``W``: no refinement needed)."""
        f64 = dtype == torch.float64
        eps = torch.finfo(dtype).eps
        reg = self.reg if self.reg is not None else (1e-12 if dual else eps ** 0.6)
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
            sol = self.solve(problem.to(self.dtype), detect_infeasibility, given)
            return narrowed(problem, sol, self.defaults(given, False)[0])
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
        sides = Sides(scaled)
        state = initial_point(view, scaled, sides, reg)
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
            subsides = sides if everyone else sides.select(idx)
            res, parts = _residuals(sub, subscale, subsides, st)
            jammed = (last_step if everyone else last_step.index_select(0, idx)) < 1e-8
            new = _classify(sub, subsides, st, res, parts, jammed, tol, inf_tol, k == self.max_iter)
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
            step, alpha, ok = _step(sub, subsides, st, parts, res, reg, tol, w_min)
            status[idx[~ok & go]] = QPStatus.NUMERICAL
            state.advance_(idx if not everyone else None, step, torch.where(ok & go, alpha, 0.0))
            last_step2.index_copy_(0, idx, last_step.index_select(0, idx))
            last_step.index_copy_(0, idx, alpha)
        x, lam, mu = scaling.unscale(view.to_original(state.x), state.lam, state.mu(sides))
        slack_u, slack_l = sides.upper_lower(state.s, float("inf"))
        slack_u, slack_l = slack_u / scaling.E_G, slack_l / scaling.E_G
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


def _residuals(view, scaling: Scaling, sides: Sides, st: State):
    """The scaled stopping measure of each sample and the residual vectors the step needs.

    The measures are those of the original problem, obtained by undoing the equilibration
    on each term (``r_d = D⁻¹ r̃_d / σ``, ``r_e = E_A⁻¹ r̃_e``, ``r_k = E_G⁻¹ r̃_k``, ...)."""
    P = view.problem
    f, sg = sides.mask, sides.sign
    Qx, Ax, Gx, Cty = view.products(st.x, st.lam, st.mu(sides))
    r_d = Qx + view.c + Cty
    r_e = Ax - P.b
    r_s = f * (sg * (Gx.unsqueeze(1) - sides.bound) + st.s)  # slack residuals, per side
    gap = (f * st.z * st.s).sum((1, 2))
    obj = 0.5 * (st.x * Qx).sum(-1) + (view.c * st.x).sum(-1)
    sigma, Dinv = scaling.sigma, scaling.D.reciprocal()
    r_d0, Qx0, Cty0, c0 = (Dinv * v / sigma[:, None] for v in (*view.original(r_d, Qx, Cty), P.c))
    EA, EG = scaling.E_A.unsqueeze(1), scaling.E_G.unsqueeze(1)
    eq = torch.stack([r_e, Ax, P.b], 1) / EA
    ineq = torch.cat([r_s, Gx.unsqueeze(1), f * sides.bound], 1) / EG
    eq_n, ineq_n = _inf_rows(eq), _inf_rows(ineq)
    dual_n = _inf_rows(torch.stack([r_d0, Qx0, c0, Cty0], 1))
    S = f.shape[1]
    measure = torch.stack([
        eq_n[:, 0] / (1 + eq_n[:, 1:].amax(1)),
        ineq_n[:, :S].amax(1) / (1 + ineq_n[:, S:].amax(1)),
        dual_n[:, 0] / (1 + dual_n[:, 1:].amax(1)),
        (gap / sigma) / (1 + (obj / sigma).abs())], 1)
    res = measure.amax(1)  # non-finite anywhere (x, λ, z, s) reaches res through these terms
    parts = dict(r_d=r_d, r_e=r_e, r_s=r_s, gap=gap, Qx=Qx, Ax=Ax, Gx=Gx, Aty=Cty,
                 gap_scale=sigma + obj.abs())
    return res, parts


def _inf_rows(t: Tensor) -> Tensor:
    """∞-norms of ``t (B, k, d)`` over its last dim, ``(B, k)`` (0 for ``d = 0``)."""
    return t.abs().amax(-1) if t.shape[-1] else t.new_zeros(t.shape[:-1])


def _classify(view, sides: Sides, st: State, res, parts, jammed, tol, inf_tol, last: bool) -> Tensor:
    """The new status of each running sample (``RUNNING`` if it goes on).

    Certificates are tested on the equilibrated problem (they are invariant to the scaling
    up to the direction's scale). Jammed samples (the last step was < 1e-8 of the way: an
    infeasible start stuck at a complementary point while the certificate forms) accept them
    at the looser ``√inf_tol`` instead of burning the remaining iterations."""
    P = view.problem
    f, sg = sides.mask, sides.sign
    certificate_tol = torch.where(jammed, inf_tol ** 0.5, inf_tol)
    tiny = torch.finfo(res.dtype).tiny
    new = torch.full(res.shape, RUNNING, dtype=torch.int64, device=res.device)
    scale = view.data_scale
    if view.may_be_unbounded:  # x/‖x‖∞ → a ray d with Qd ≈ 0, Ad ≈ 0, Gd in the recession cone
        nx = inf_norm(st.x).clamp_min(tiny)
        cone = (f * (sg * parts["Gx"].unsqueeze(1)).clamp_min(0)).flatten(1)
        flat = torch.maximum(torch.maximum(inf_norm(parts["Qx"]), inf_norm(parts["Ax"])), inf_norm(cone))
        descent = (view.c * st.x).sum(-1) < -inf_tol ** 0.5 * (1 + inf_norm(view.c)) * nx
        new = torch.where((flat <= certificate_tol * scale * nx) & descent, QPStatus.UNBOUNDED, new)
    # infeasible (Farkas): (λ, z)/ν → a certificate with Aᵀλ + Gᵀμ ≈ 0, dual value < 0
    nu = torch.maximum(inf_norm(st.lam), inf_norm(st.z.flatten(1))).clamp_min(tiny)
    value = (P.b * st.lam).sum(-1) + (sg * f * sides.bound * st.z).sum((1, 2))
    d_scale = 1 + torch.maximum(inf_norm(P.b), inf_norm((f * sides.bound).flatten(1)))
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


def _max_step(v: Tensor, dv: Tensor, mask: Tensor) -> Tensor:
    """Largest ``α ≤ 1`` keeping ``v + α dv > 0`` (``v > 0``) on the masked entries of
    ``(B, k, m)``: ``1 / max(1, −min dv/v)``."""
    if v.shape[-1] == 0:
        return v.new_ones(v.shape[0])
    worst = torch.where(mask > 0, dv / v, 0.0).flatten(1).amin(-1)
    return (-worst).clamp_min(1.0).reciprocal()


def _step(view, sides: Sides, st: State, parts, res: Tensor, reg: float, tol: float,
          w_min: float):
    """One Mehrotra predictor-corrector direction, its step length and the per-sample ``ok``
    of the factorization (module docstring). Both directions solve the Newton system; they
    differ only in ``r_c``, so the corrector is the predictor plus one solve with
    ``(0, 0, −W Δρ)``. The centering target ``στ`` is kept above a tenth of the gap the
    stopping test needs: driving the slacks of active constraints far below it (to round-off,
    where ``W ≪ δ``) only degrades the directions; polishing finishes the job exactly.

    Per side ``k`` (sign ``σ_k``): ``ds_k = −r_k − σ_k G dx``, ``dz_k = −(r_c,k + z_k ds_k)/s_k``,
    ``W⁻¹ = Σ_k z_k/s_k``, ``ρ = Σ_k σ_k (z_k r_k − r_c,k)/s_k``."""
    f, sg = sides.mask, sides.sign
    r_s = parts["r_s"]
    z, s = st.z, st.s
    ratio = f * z / s
    D = ratio.sum(1)
    W = D.reciprocal().clamp_min(w_min)
    share = ratio / D.unsqueeze(1)  # each side's part of W⁻¹
    fac = view.factor(W, reg)
    # the primal order's δ-penalized equality block needs refinement; the dual order's
    # regularization is negligible next to its floor w_min
    refine = not is_whitened(view)

    def solve(r1, r2, r3):
        """``M⁻¹ r``, with one step of refinement against the unregularized ``M`` where the
        regularization matters (``refine``). The step is kept only where it reduces the
        residual (where ``M`` is singular, e.g. more active constraints than unknowns,
        refinement would amplify its null space by 1/δ)."""
        zz = fac.solve_and_product(r1, r2, r3)
        if not refine:
            return zz
        res0 = _residual(view.kkt_product(W, *zz[:3]), (r1, r2, r3))
        d = fac.solve_and_product(*res0)
        z1 = tuple(zi + di for zi, di in zip(zz, d))
        better = _norm(_residual(view.kkt_product(W, *z1[:3]), (r1, r2, r3))) < _norm(res0)
        keep = better.unsqueeze(-1)
        return tuple(torch.where(keep, a, b) for a, b in zip(z1, zz))

    def direction(rc: Tensor, residuals: bool):
        """``(dx, dλ, dz, ds)`` for the complementarity residual ``rc`` (``residuals``: with the
        primal-dual residuals, the predictor; without, the corrector's increment). ``dz`` is
        matched to the solve's ``dμ``, which keeps ``r_d`` linear: the floor ``w_min`` makes
        ``dμ`` differ from ``W_true⁻¹ G dx + ρ``; the difference is split over the sides in
        proportion to their share of ``W⁻¹`` (all of it on one-sided rows)."""
        rk = r_s if residuals else 0.0
        rho = (sg * f * (z * rk - rc) / s).sum(1)
        if residuals:
            dx, dl, dmu, Gdx = solve(-parts["r_d"], -parts["r_e"], -W * rho)
        else:
            zero = parts["r_d"].new_zeros(())
            dx, dl, dmu, Gdx = solve(zero.expand_as(parts["r_d"]), zero.expand_as(parts["r_e"]),
                                     -W * rho)
        ds = f * (-rk - sg * Gdx.unsqueeze(1))
        dz = f * (-rc - z * ds) / s
        mismatch = dmu - (sg * dz).sum(1)
        return dx, dl, dz + sg * share * mismatch.unsqueeze(1), ds

    count = sides.count
    dx, dl, dz, ds = direction(f * z * s, True)  # predictor: σ = 0
    a_aff = torch.minimum(_max_step(s, ds, f), _max_step(z, dz, f))
    tau = parts["gap"] / count

    def complementarity(alpha: Tensor) -> Tensor:
        """The mean complementarity after a step of ``alpha`` along the current direction."""
        a = alpha.reshape(-1, 1, 1)
        return (f * (s + a * ds) * (z + a * dz)).sum((1, 2)) / count

    tau_aff = complementarity(a_aff)
    sigma = (tau_aff / tau.clamp_min(torch.finfo(tau.dtype).tiny)).clamp(0, 1) ** 3
    floor = 0.1 * tol * parts["gap_scale"] / count
    target = torch.maximum(sigma * tau, floor).reshape(-1, 1, 1)
    # the second-order term weighted by √a_aff (a safeguarded Mehrotra corrector): where the
    # affine direction is blocked early (a_aff ≪ 1, as on degenerate problems) its full
    # weight made the steps cycle, the gap growing every other iteration
    a = a_aff.sqrt().reshape(-1, 1, 1)
    cx, cl, cz, cs = direction(f * (a * ds * dz - target), False)
    dx, dl, dz, ds = dx + cx, dl + cl, dz + cz, ds + cs
    eta = 1 - res.clamp(1e-4, 0.01)
    alpha = eta * torch.minimum(_max_step(s, ds, f), _max_step(z, dz, f))
    # once the iterate is nearly feasible (residuals below the mean complementarity) and
    # near the end (measure ≤ 1e-3: early on, with a far bound's large initial gap, backing
    # off froze the iterate for dozens of steps), back off (halving, at most 6 times) while
    # the step would raise the mean complementarity: on degenerate problems a nearly
    # singular system can give a long direction whose second-order term α² ds∘dz outweighs
    # the decrease, and the iterates then cycle
    infeasibility = torch.stack([inf_norm(parts["r_d"]), inf_norm(parts["r_e"]),
                                 inf_norm(r_s.flatten(1))]).amax(0)
    settled = (infeasibility <= tau) & (res <= 1e-3)
    for _ in range(6):
        worse = settled & (complementarity(alpha) > tau)
        if not bool(worse.any()):
            break
        alpha = torch.where(worse, alpha / 2, alpha)
    ok = fac.ok & torch.isfinite(alpha)
    return (dx, dl, dz, ds), torch.where(ok, alpha, 0.0), ok
