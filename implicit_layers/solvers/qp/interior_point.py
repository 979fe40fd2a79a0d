"""Batched primal-dual interior point (Mehrotra predictor-corrector) for convex QPs.

    min_x ½ xᵀQx + cᵀx   s.t.  Ax = b,  Gx + s = h,  s ≥ 0

with multipliers ``λ`` (equalities) and ``μ ≥ 0`` (inequalities). Each iteration solves the
Newton system of the perturbed KKT conditions

    Qx + c + Aᵀλ + Gᵀμ = 0,   Ax = b,   Gx + s = h,   s ∘ μ = σ τ 𝟙

whose matrix, after eliminating ``ds``, is the quasi-definite ``M`` of
:mod:`implicit_layers.linalg.kkt.inequality` with ``W = diag(s/μ)``, factored in one of two orders (see
``kkt_form``; :mod:`implicit_layers.solvers.qp.data` holds the problem in the matching
coordinates). A sample that stops keeps the factorization at the point it returns: the
layer's backward and JVP reuse it without refactoring.

Torch ops only (CPU and CUDA). Samples stop independently; only the running ones are
gathered and stepped. Each sample ends with a :class:`QPStatus`:

* ``SOLVED``: the primal and dual residuals, each relative to the terms it sums (e.g.
  ``‖Qx + c + Aᵀλ + Gᵀμ‖∞ / (1 + max(‖Qx‖∞, ‖c‖∞, ‖Aᵀλ + Gᵀμ‖∞))``), and the relative
  complementarity gap are below ``tol``;
* ``INFEASIBLE``: the multipliers approach a Farkas certificate
  (``Aᵀλ + Gᵀμ ≈ 0``, ``bᵀλ + hᵀμ < 0``, ``μ ≥ 0``);
* ``UNBOUNDED``: ``x`` approaches a ray ``d`` with ``Qd ≈ 0``, ``Ad ≈ 0``, ``Gd ≲ 0``, ``cᵀd < 0``;
* ``MAX_ITER``: none of the above after ``max_iter`` iterations;
* ``NUMERICAL``: the KKT factorization failed or the iterate became non-finite.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.linalg.kkt.inequality import QPKKTFactor, _mv
from implicit_layers.solvers.qp.base import QPSolution, QPSolver, QPStatus
from implicit_layers.solvers.qp.data import WhitenedData, _inf, qp_data
from implicit_layers.stats import SolverStats

RUNNING = -1


def _max_step(s: Tensor, ds: Tensor, mu: Tensor, dmu: Tensor) -> Tensor:
    """Largest ``α ≤ 1`` with ``s + α ds ≥ 0`` and ``μ + α dμ ≥ 0`` per sample (``s, μ > 0``):
    ``1 / max(1, −min(ds/s, dμ/μ))``."""
    if s.shape[-1] == 0:
        return s.new_ones(s.shape[0])
    worst = torch.minimum((ds / s).amin(-1), (dmu / mu).amin(-1))  # most negative relative change
    return (-worst).clamp_min(1.0).reciprocal()


class InteriorPoint(QPSolver):
    """Batched Mehrotra predictor-corrector interior point for dense convex QPs.

    Args:
        tol: stopping tolerance on scaled residuals and gap (default ``1e-12`` in float64,
            ``1e-5`` in float32).
        max_iter: iteration cap; samples still running get ``MAX_ITER``.
        reg: diagonal regularization ``δ`` of the KKT factorization (default: ``ε^0.6`` of the
            dtype, ~4e-10 in float64, in the primal order; ``1e-9`` in the dual order). It only
            perturbs search directions, not the solution, and makes linear programs and
            singular ``Q`` solvable.
        infeasibility_tol: tolerance of the infeasibility/unboundedness certificates
            (default ``1e-8`` float64, ``1e-4`` float32).
        floor: lower bound on ``s/μ`` in the factorization kept for the backward and JVP in
            the primal order (default ``1e-8`` float64, ``1e-4`` float32; the dual order needs
            none and reuses its last iteration's factorization). Strongly active constraints
            would otherwise make ``Q + GᵀW⁻¹G`` arbitrarily ill-conditioned as ``tol → 0``; one
            round of iterative refinement against the exact matrix removes the floor's effect.
        kkt_form: how the Newton systems are factored. ``"primal"``: ``Q + GᵀW⁻¹G`` (n × n)
            and a p × p Schur complement per iteration, any positive semidefinite ``Q``.
            ``"dual"``: for positive definite, well-conditioned ``Q``, iterate in whitened
            coordinates and factor the m × m matrix ``G Z Gᵀ + W``, whose ``G Z Gᵀ`` is
            computed once (:mod:`implicit_layers.linalg.kkt.reduced`); falls back to
            ``"primal"`` for the batch if some ``Q`` is singular or ill-conditioned (estimated
            condition number above 1e6 in float64, 1e2 in float32).
            ``"auto"`` (default): ``"dual"`` where it costs fewer flops per iteration
            (``m ≲ 2.5 n``).

    >>> import torch
    >>> from implicit_layers.solvers.qp.interior_point import InteriorPoint
    >>> Q = torch.eye(2, dtype=torch.float64)[None]; c = torch.tensor([[-1., -1.]]).double()
    >>> G = torch.tensor([[[1., 1.]]]).double(); h = torch.tensor([[1.]]).double()
    >>> A, b = Q.new_zeros(1, 0, 2), Q.new_zeros(1, 0)
    >>> sol = InteriorPoint().solve(Q, c, A, b, G, h)
    >>> sol.x.round(decimals=6), int(sol.status)
    (tensor([[0.5000, 0.5000]], dtype=torch.float64), 0)
    """

    name = "InteriorPoint"

    def __init__(self, tol: float | None = None, max_iter: int = 50, reg: float | None = None,
                 infeasibility_tol: float | None = None, floor: float | None = None,
                 kkt_form: str = "auto"):
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if kkt_form not in ("auto", "primal", "dual"):
            raise ValueError(f"kkt_form must be 'auto', 'primal' or 'dual', got {kkt_form!r}")
        self.tol, self.max_iter, self.reg, self.infeasibility_tol = tol, max_iter, reg, infeasibility_tol
        self.floor, self.kkt_form = floor, kkt_form

    def _use_dual(self, Q: Tensor, A: Tensor, G: Tensor) -> bool:
        """Whether to try the reduced (dual) order: asked for, or cheaper per iteration."""
        if self.kkt_form != "auto":
            return self.kkt_form == "dual"
        n, p, m = Q.shape[-1], A.shape[-2], G.shape[-2]
        return m > 0 and m ** 3 / 3 < 2 * n * n * m + n ** 3 / 3 + n * n * p

    def _defaults(self, dtype: torch.dtype, dual: bool) -> tuple[float, float, float, float]:
        """``(tol, reg, inf_tol, cap)``: ``cap`` bounds ``μ/s`` in the factorizations.

        The primal order's ``Q + GᵀW⁻¹G`` needs ``W⁻¹ ≤ cap`` and ``δ = ε^0.6`` to stay
        factorable (``cap = 1e10``, float32 ``ε^-½``); the dual order's ``G Z Gᵀ + W`` only
        grows better conditioned as ``W⁻¹`` grows, and there a large ``δ`` or a tight cap would
        keep the directions of the active constraints from converging (float32 stalled at
        ``w ≥ 3e-4``): ``cap = 1e10``, ``δ = 1e-9`` in both dtypes.
        """
        f64 = dtype == torch.float64
        tol = self.tol if self.tol is not None else (1e-12 if f64 else 1e-5)
        reg = self.reg if self.reg is not None else (1e-9 if dual else torch.finfo(dtype).eps ** 0.6)
        inf_tol = self.infeasibility_tol if self.infeasibility_tol is not None else (1e-8 if f64 else 1e-4)
        cap = 1e10 if f64 or dual else torch.finfo(dtype).eps ** -0.5
        return tol, reg, inf_tol, cap

    def solve(self, Q, c, A, b, G, h) -> QPSolution:
        """Solve a flat batch: ``Q (B,n,n)``, ``c (B,n)``, ``A (B,p,n)``, ``b (B,p)``,
        ``G (B,m,n)``, ``h (B,m)`` (``p = 0`` for no equalities)."""
        B, p = Q.shape[0], A.shape[-2]
        if B == 0:  # an empty batch: empty outputs (and gradients), nothing to solve
            none = torch.zeros(0, dtype=torch.int64, device=Q.device)
            stats = SolverStats(self.name, none, Q.new_zeros(0), none.bool(), evaluations=0)
            stats.extra["status"] = none
            return QPSolution(c.clone(), b.clone(), h.clone(), h.clone(), none, stats,
                              QPKKTFactor.identity(Q, A, G))
        data = qp_data(Q, c, A, b, G, h, whiten=self._use_dual(Q, A, G))
        dual = isinstance(data, WhitenedData)
        tol, reg, inf_tol, cap = self._defaults(Q.dtype, dual)
        floor = self.floor if self.floor is not None or dual else (1e-8 if Q.dtype == torch.float64 else 1e-4)
        fac = data.factor(torch.ones_like(h), reg)
        x, y, s = self._initial_point(fac, data)
        status = torch.full((B,), RUNNING, dtype=torch.int64, device=Q.device)
        iters = torch.zeros(B, dtype=torch.int64, device=Q.device)
        residual = torch.full((B,), float("inf"), dtype=Q.dtype, device=Q.device)
        final = data.placeholder()
        last_step = torch.ones(B, dtype=Q.dtype, device=Q.device)  # each sample's last step length
        for k in range(self.max_iter + 1):
            idx = (status == RUNNING).nonzero().squeeze(-1)
            if idx.numel() == 0:
                break
            everyone = idx.numel() == B
            sub = data if everyone else data.select(idx)
            xk, yk, sk = (t if everyone else t.index_select(0, idx) for t in (x, y, s))
            (r_d, r_p), res, products = self._residuals(sub, xk, yk, sk)
            jammed = (last_step if everyone else last_step.index_select(0, idx)) < 1e-8
            new = self._classify(sub, xk, yk, sk, res, products, jammed, tol, inf_tol, k == self.max_iter)
            if everyone:
                status.copy_(new), iters.fill_(k), residual.copy_(res)
            else:
                status[idx], iters[idx], residual[idx] = new, k, res
            stop = new != RUNNING
            mu_k = yk[..., p:]
            if k > 0:  # at k = 0, s = μ: W = I, the initial point's factorization
                fac = sub.factor((mu_k / sk).clamp_max(cap), reg)
            if bool(stop.any()):  # the factorization the backward and JVP will reuse
                j = stop.nonzero().squeeze(-1)
                if floor is None:  # this very factorization
                    final.put_(idx[j], fac, src=j)
                else:
                    mj, sj = mu_k.index_select(0, j), sk.index_select(0, j)
                    final.put_(idx[j], data.select(idx[j]).factor((mj / sj).clamp_max(1 / floor), reg))
                if bool(stop.all()):
                    continue
            dx, dy, ds, alpha = self._step(fac, r_d, r_p, res, sk, yk, p)
            status[idx[~fac.ok & ~stop]] = QPStatus.NUMERICAL
            move = (fac.ok & ~stop)[:, None]  # samples that stopped keep their point exactly
            for state, d in ((x, dx), (y, dy), (s, ds)):
                step = torch.where(move, alpha[:, None] * d, 0.0)
                state.add_(step) if everyone else state.index_add_(0, idx, step)
            last_step.index_copy_(0, idx, alpha)
        solved = status == QPStatus.SOLVED
        final.ok &= solved
        stats = SolverStats(self.name, iters, residual, solved, evaluations=int(iters.max()) + 1)
        stats.extra["status"] = status
        return QPSolution(data.to_original(x), y[..., :p], y[..., p:], s, status, stats, final)

    @staticmethod
    def _residuals(data, x, y, s):
        """KKT residuals ``r_d = Qx + c + Cᵀy`` and ``r_p = Cx − d + [0; s]``, the scaled
        stopping measure, and the products ``(Qx, Cx, Cᵀy)`` the certificates reuse.

        Each residual is measured relative to the terms it sums (in the original coordinates),
        ``‖r_d‖ / (1 + max(‖Qx‖, ‖c‖, ‖Cᵀy‖))`` and ``‖r_p‖ / (1 + max(‖Cx‖, ‖d‖))``: round-off
        in those terms bounds what any tolerance can reach, e.g. ``ε‖Q‖‖x‖`` for an
        ill-conditioned ``Q``."""
        Qx, Cx, Cty = data.products(x, y)
        p, m = data.p, s.shape[-1]
        r_d = Qx + data.c + Cty
        r_p = Cx - data.d
        r_p[..., p:] += s
        gap = (s * y[..., p:]).sum(-1) / max(m, 1)
        obj = 0.5 * (x * Qx).sum(-1) + (data.c * x).sum(-1)
        r_d0, Qx0, Cty0 = data.original(r_d, Qx, Cty)
        primal = _inf(r_p) / torch.maximum(data.d_scale, 1 + _inf(Cx))
        dual = _inf(r_d0) / torch.maximum(data.c_scale, 1 + torch.maximum(_inf(Qx0), _inf(Cty0)))
        res = torch.maximum(torch.maximum(primal, dual), gap / (1 + obj.abs()))
        return (r_d, r_p), res, (Qx, Cx, Cty)

    def _classify(self, data, x, y, s, res, products, jammed, tol, inf_tol, last: bool) -> Tensor:
        """The new status of each running sample (``RUNNING`` if it goes on)."""
        Qx, Cx, Cty = products
        p, c, d, scale = data.p, data.c, data.d, data.scale
        # Jammed (the last step was < 1e-8 of the way: an infeasible start's iterate stuck at
        # a complementary point while the certificate is still forming): certificates are
        # accepted at the looser √inf_tol, like OSQP's (1e-4 in float64), instead of burning
        # the remaining iterations.
        certificate_tol = torch.where(jammed, inf_tol ** 0.5, inf_tol)
        new = torch.full(res.shape, RUNNING, dtype=torch.int64, device=res.device)
        if data.may_be_unbounded:  # x/‖x‖∞ → ray r with Qr ≈ 0, Ar ≈ 0, Gr ≲ 0, cᵀr < 0
            nx = _inf(x).clamp_min(torch.finfo(x.dtype).tiny)
            flat = torch.maximum(torch.maximum(_inf(Qx), _inf(Cx[..., :p])), _inf(Cx[..., p:].clamp_min(0)))
            descent = (c * x).sum(-1) < -inf_tol ** 0.5 * (1 + _inf(c)) * nx
            new = torch.where((flat <= certificate_tol * scale * nx) & descent, QPStatus.UNBOUNDED, new)
        # infeasible (Farkas): (λ, μ)/ν → certificate z with z_G ≥ 0, Cᵀz ≈ 0, dᵀz < 0
        nu = _inf(y).clamp_min(torch.finfo(y.dtype).tiny)
        infeasible = (_inf(Cty) <= certificate_tol * scale * nu) & (
            (d * y).sum(-1) < -inf_tol ** 0.5 * data.d_scale * nu)
        new = torch.where(infeasible, QPStatus.INFEASIBLE, new)
        new = torch.where(res <= tol, QPStatus.SOLVED, new)
        # res is NaN or ∞ as soon as any of x, λ, μ, s is (through the residuals and the gap)
        new = torch.where(torch.isfinite(res), new, QPStatus.NUMERICAL)
        return torch.where(new == RUNNING, QPStatus.MAX_ITER, new) if last else new

    @staticmethod
    def derivative_system(sol: QPSolution, G: Tensor, h: Tensor, x: Tensor, mu: Tensor):
        """``(G, w, keep)`` of the derivative KKT matrix ``M`` at the solution: ``w = s/μ``.

        Differentiable in ``G, h, x, μ`` (for double backward): the slack takes the solver's
        positive value and the derivative of ``h − Gx``. The stored factorization used ``w``
        bounded below (``floor``, or the iteration's ``1/cap``) and the regularization ``δ``;
        refinement against this exact ``w`` makes up the difference.
        Failed samples get ``w = 1`` (their factorization solves to zero anyway).
        ``keep = None``: no row of ``M`` is masked.
        """
        ok = sol.factor.ok[:, None]
        s_exact = h - _mv(G, x)
        s = s_exact + (sol.slack - s_exact).detach()
        one = torch.ones((), dtype=mu.dtype, device=mu.device)
        return G, torch.where(ok, s, one) / torch.where(ok, mu, one), None

    @staticmethod
    def _step(fac, r_d, r_p, res, s, y, p: int):
        """One Mehrotra predictor-corrector direction ``(dx, dy, ds)`` and step length.

        Both directions solve the Newton system with right-hand side
        ``(−r_d, −r_e, −r_i + r_c/μ)``, where ``Z ds + S dμ = −r_c`` and ``G dx + ds = −r_i``
        (hence ``G dx − (s/μ) dμ = −r_i + r_c/μ``). They differ only in ``r_c``, so the
        corrector is the predictor plus one solve with ``(0, 0, Δr_c/μ)``.
        """
        m, mu, r_e, r_i = s.shape[-1], y[..., p:], r_p[..., :p], r_p[..., p:]
        dx, dl, dm, Gdx = fac.solve_and_product(-r_d, -r_e, s - r_i)  # predictor: r_c = s∘μ
        ds = -r_i - Gdx
        a_aff = _max_step(s, ds, mu, dm)
        tau = (s * mu).sum(-1) / max(m, 1)
        tau_aff = ((s + a_aff[:, None] * ds) * (mu + a_aff[:, None] * dm)).sum(-1) / max(m, 1)
        sigma = (tau_aff / tau.clamp_min(torch.finfo(s.dtype).tiny)).clamp(0, 1) ** 3
        cx, cl, cm, Gcx = fac.solve_and_product(None, None, (ds * dm - (sigma * tau)[:, None]) / mu)
        dx, dm, ds = dx + cx, dm + cm, ds - Gcx
        eta = 1 - res.clamp(max=0.01)
        alpha = eta * _max_step(s, ds, mu, dm)
        return dx, torch.cat([dl + cl, dm], dim=-1), ds, alpha

    @staticmethod
    def _initial_point(fac, data):
        """Solve the KKT system with ``W = I`` (``fac``), shift ``s`` and ``μ`` into the interior
        and take their geometric mean for both: ``s = μ`` makes ``W = S/Z = I`` at the start, so
        the first iteration reuses ``fac`` instead of factoring again (and, on random QPs, needs
        ~8% fewer iterations than keeping them apart)."""
        p = data.p
        x, lam, z, _ = fac.solve_and_product(-data.c, data.d[..., :p], data.d[..., p:])

        def shift(v):
            worst = -v.amin(-1, keepdim=True) if v.shape[-1] > 0 else v.new_zeros(v.shape[0], 1)
            return torch.where(worst >= 0, v + 1 + worst, v)

        s = (shift(-z) * shift(z)).sqrt()  # G x − z = h ⇒ −z is the slack h − Gx
        return x, torch.cat([lam, s], dim=-1), s.clone()
