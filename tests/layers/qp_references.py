"""Independent references for the QP tests: Clarabel called directly (no cvxpy compile per
problem, so hundreds of references stay cheap), closed-form projections, random feasible QPs.

Sign convention of the returned multipliers: the layer's, ``Qx + c + Aᵀλ + Gᵀμ = 0`` with
``μ > 0`` where the upper bound is active and ``μ < 0`` where the lower one is.
"""

from __future__ import annotations

import clarabel
import numpy as np
import scipy.sparse as sp
import torch

TIGHT = dict(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-10,
             max_iter=400)


def clarabel_qp(Q, c, A=None, b=None, G=None, lower=None, upper=None, **settings):
    """``(x, λ, μ, status)`` of ``min ½xᵀQx + cᵀx s.t. Ax = b, lower ≤ Gx ≤ upper`` by
    Clarabel (NumPy float64 arrays; infinite bounds, or ``|bound| ≥ 1e20``, are dropped)."""
    Q, c = np.asarray(Q, float), np.asarray(c, float)
    n = c.shape[0]
    A = np.zeros((0, n)) if A is None else np.asarray(A, float)
    b = np.zeros(0) if b is None else np.asarray(b, float)
    G = np.zeros((0, n)) if G is None else np.asarray(G, float)
    m = G.shape[0]
    upper = np.full(m, np.inf) if upper is None else np.asarray(upper, float)
    lower = np.full(m, -np.inf) if lower is None else np.asarray(lower, float)
    hu, hl = np.abs(upper) < 1e20, np.abs(lower) < 1e20
    rows = sp.vstack([sp.csc_matrix(A), sp.csc_matrix(G[hu]), sp.csc_matrix(-G[hl])], format="csc")
    rhs = np.concatenate([b, upper[hu], -lower[hl]])
    cones = ([clarabel.ZeroConeT(len(b))] if len(b) else []) + (
        [clarabel.NonnegativeConeT(int(hu.sum() + hl.sum()))] if hu.any() or hl.any() else [])
    opts = clarabel.DefaultSettings()
    opts.verbose = False
    for k, v in {**TIGHT, **settings}.items():
        setattr(opts, k, v)
    P = sp.triu(sp.csc_matrix((Q + Q.T) / 2), format="csc")
    sol = clarabel.DefaultSolver(P, c, rows, rhs, cones, opts).solve()
    z = np.asarray(sol.z)
    mu = np.zeros(m)
    mu[hu] += z[len(b):len(b) + hu.sum()]
    mu[hl] -= z[len(b) + hu.sum():]
    return np.asarray(sol.x), z[:len(b)], mu, str(sol.status)


def clarabel_batch(Q, c, A=None, b=None, G=None, lower=None, upper=None, **settings):
    """:func:`clarabel_qp` for each sample of flat batched tensors; ``(x, λ, μ)`` as float64
    tensors and the list of statuses."""
    B = c.shape[0]
    pick = lambda t, i: None if t is None else t[i].detach().double().numpy()  # noqa: E731
    out = [clarabel_qp(*(pick(t, i) for t in (Q, c, A, b, G, lower, upper)), **settings)
           for i in range(B)]
    stack = lambda k: torch.as_tensor(np.stack([o[k] for o in out]))  # noqa: E731
    return stack(0), stack(1), stack(2), [o[3] for o in out]


def simplex_projection(p: np.ndarray) -> np.ndarray:
    """The Euclidean projection of ``p`` onto ``{x ≥ 0, Σx ≤ 1}`` (closed form: clip at 0;
    if that leaves the simplex, the sorting projection onto ``Σx = 1``)."""
    x = np.maximum(p, 0.0)
    if x.sum() <= 1.0:
        return x
    u = np.sort(p)[::-1]
    css = np.cumsum(u)
    k = np.nonzero(u * np.arange(1, len(p) + 1) > css - 1.0)[0][-1]
    return np.maximum(p - (css[k] - 1.0) / (k + 1), 0.0)


def random_feasible_qps(gen: torch.Generator, B: int, n: int, m: int, p: int, singular: bool,
                        two_sided: bool = False):
    """``(Q, c, A, b, G, lower, upper)`` of ``B`` random QPs that are feasible and bounded by
    construction, but not built around a known solution.

    A point ``x₀`` satisfies every constraint (about a third of the inequality sides tight
    there), and dual-feasible multipliers give ``c = −(Q y₀ + Aᵀλ₀ + Gᵀμ₀)`` for another
    point ``y₀`` (weak duality then bounds the objective below). ``singular``: ``Q`` of rank
    about n/2 (PSD). ``two_sided``: finite lower bounds too (``μ₀`` of either sign)."""
    r = lambda *s: torch.randn(B, *s, generator=gen, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(B, *s, generator=gen, dtype=torch.float64)  # noqa: E731
    k = max(1, n // 2) if singular else n
    M = r(n, k)
    Q = M @ M.mT / k + (0.0 if singular else 0.1) * torch.eye(n, dtype=torch.float64)
    A, G, x0, y0 = r(p, n), r(m, n), r(n), r(n)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    Gx0 = (G @ x0.unsqueeze(-1)).squeeze(-1)
    tight_up = u(m) < 1 / 3
    upper = Gx0 + torch.where(tight_up, 0.0, u(m))
    if two_sided:
        tight_lo = (u(m) < 1 / 3) & ~tight_up
        lower = Gx0 - torch.where(tight_lo, 0.0, u(m))
        mu0 = r(m)
    else:
        lower = torch.full_like(upper, -float("inf"))
        mu0 = u(m)
    lam0 = r(p)
    c = -((Q @ y0.unsqueeze(-1)).squeeze(-1) + (A.mT @ lam0.unsqueeze(-1)).squeeze(-1)
          + (G.mT @ mu0.unsqueeze(-1)).squeeze(-1))
    return Q, c, A, b, G, lower, upper


def linprog_objective(c, A=None, b=None, G=None, lower=None, upper=None) -> float:
    """The optimal value of ``min cᵀx s.t. Ax = b, lower ≤ Gx ≤ upper`` (x free) by
    ``scipy.optimize.linprog`` (HiGHS); infinite bounds dropped."""
    from scipy.optimize import linprog

    c = np.asarray(c, float)
    n = c.shape[0]
    G = np.zeros((0, n)) if G is None else np.asarray(G, float)
    upper = np.full(G.shape[0], np.inf) if upper is None else np.asarray(upper, float)
    lower = np.full(G.shape[0], -np.inf) if lower is None else np.asarray(lower, float)
    hu, hl = np.isfinite(upper), np.isfinite(lower)
    res = linprog(c, A_ub=np.vstack([G[hu], -G[hl]]), b_ub=np.concatenate([upper[hu], -lower[hl]]),
                  A_eq=None if A is None else np.asarray(A, float),
                  b_eq=None if b is None else np.asarray(b, float),
                  bounds=(None, None), method="highs")
    assert res.status == 0, res.message
    return float(res.fun)


def closest_feasible_reference(Q, c, A, b, G, lower, upper):
    """proxsuite's closest feasible QP by its definition, with Clarabel: the least-norm shift
    ``s* = argmin ½‖(s_E, s_U, s_L)‖² s.t. ∃x: Ax = b + s_E, l − s_L ≤ Gx ≤ u + s_U`` (each
    side relaxed on its own; absent sides get no shift), then the QP with shifted constraints.
    NumPy float64 in and out: ``(x, s*)`` with ``s* = (s_E, s_U, s_L)``."""
    n, p, m = c.shape[0], A.shape[0], G.shape[0]
    N = n + p + 2 * m
    Q1 = np.zeros((N, N))
    Q1[n:, n:] = np.eye(p + 2 * m)
    A1 = np.hstack([A, -np.eye(p), np.zeros((p, 2 * m))])
    G_up = np.hstack([G, np.zeros((m, p)), -np.eye(m), np.zeros((m, m))])
    G_lo = np.hstack([G, np.zeros((m, p)), np.zeros((m, m)), np.eye(m)])
    inf = np.full(m, np.inf)
    z, _, _, status = clarabel_qp(Q1, np.zeros(N), A1, b, np.vstack([G_up, G_lo]),
                                  np.concatenate([-inf, lower]), np.concatenate([upper, inf]))
    assert status in ("Solved", "AlmostSolved"), status
    s = z[n:]
    s[p:p + m][~np.isfinite(upper)] = 0.0
    s[p + m:][~np.isfinite(lower)] = 0.0
    x, _, _, status = clarabel_qp(Q, c, A, b + s[:p], G, lower - s[p + m:], upper + s[p:p + m])
    assert status in ("Solved", "AlmostSolved"), status
    return x, s
