"""OSQP forward solver for :class:`~implicit_layers.QPLayer`, with an active-set backward.

OSQP (ADMM with solution polishing) runs on the CPU, one sample at a time, on sparse copies
of the data: tensors are moved to NumPy explicitly and the results back to the input's
device. It suits sparse or large problems whose dense interior-point factorizations would
not fit.

The backward and JVP use the same derivative KKT matrix as the interior point, at the
active-set limit ``s/μ → 0`` (active) and ``s/μ → ∞`` (inactive). With the active set
``𝒜 = {i: sᵢ ≤ active_tol}`` the inactive rows reduce to ``μ̇ᵢ = 0`` and drop out, which is
the matrix of :mod:`~implicit_layers.layers.qp.kkt_solve` with

    G ← diag(𝟙_𝒜) G,   w = 𝟙 − 𝟙_𝒜,   and block-3 right-hand sides masked by 𝟙_𝒜,

factored once (dense LU of the full KKT matrix, per-sample singularity check) after the
solve. At strictly complementary solutions the gradients agree with the interior point's.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from implicit_layers.linalg.dense import lu_factor
from implicit_layers.solvers.qp.base import QPSolution, QPSolver, QPStatus
from implicit_layers.stats import SolverStats

_STATUS = {1: QPStatus.SOLVED, 3: QPStatus.INFEASIBLE, 4: QPStatus.INFEASIBLE,
           5: QPStatus.UNBOUNDED, 6: QPStatus.UNBOUNDED, 7: QPStatus.MAX_ITER}


class ActiveSetKKTFactor:
    """LU factors of ``K = [[Q, Aᵀ, Gₐᵀ], [A, 0, 0], [Gₐ, 0, −diag(w)]]`` for a batch."""

    def __init__(self, K: Tensor, n: int, p: int, ok: Tensor):
        n_all = K.shape[-1]
        self.n, self.p, self.ok = n, p, ok
        eye = torch.eye(n_all, dtype=K.dtype, device=K.device)
        self.LU, self.piv = lu_factor(torch.where(ok[:, None, None], K, eye))

    def solve(self, r1: Tensor, r2: Tensor, r3: Tensor):
        r = torch.cat([r1, r2, r3], -1).unsqueeze(-1)
        LU, piv = self.LU, self.piv
        if r.ndim > LU.ndim:
            LU = LU.expand(*r.shape[:-2], *LU.shape[-2:])
            piv = piv.expand(*r.shape[:-2], piv.shape[-1])
        z = torch.linalg.lu_solve(LU, piv, r).squeeze(-1)
        z = torch.where(self.ok.unsqueeze(-1), z, torch.zeros((), dtype=z.dtype, device=z.device))
        return z[..., : self.n], z[..., self.n: self.n + self.p], z[..., self.n + self.p:]

    def repeat(self, k: int) -> ActiveSetKKTFactor:
        out = ActiveSetKKTFactor.__new__(ActiveSetKKTFactor)
        out.n, out.p, out.ok = self.n, self.p, self.ok.repeat(k)
        out.LU, out.piv = self.LU.repeat(k, 1, 1), self.piv.repeat(k, 1)
        return out


class OSQP(QPSolver):
    """OSQP forward solver (CPU; sparse) for :class:`~implicit_layers.QPLayer`.

    Args:
        eps_abs, eps_rel: OSQP tolerances (polishing then recovers a near-exact solution).
        max_iter: OSQP's iteration cap.
        active_tol: a constraint counts as active when its slack is at most
            ``active_tol · (1 + |hᵢ|)`` (default ``1e-7``).
        **settings: passed on to ``osqp.OSQP.setup``.

    >>> import torch, implicit_layers as il
    >>> Q = torch.eye(2, dtype=torch.float64); c = -torch.ones(2, dtype=torch.float64)
    >>> G = torch.ones(1, 2, dtype=torch.float64); h = torch.ones(1, dtype=torch.float64)
    >>> x, lam, mu = il.QPLayer(solver=il.OSQP())(Q, c, None, None, G, h)
    >>> x.round(decimals=6)
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    name = "OSQP"

    def __init__(self, eps_abs: float = 1e-9, eps_rel: float = 1e-9, max_iter: int = 20000,
                 active_tol: float = 1e-7, **settings):
        self.settings = dict(eps_abs=eps_abs, eps_rel=eps_rel, max_iter=max_iter, polishing=True,
                             verbose=False, **settings)
        self.active_tol = active_tol

    def solve(self, Q, c, A, b, G, h) -> QPSolution:
        import osqp

        device, dtype = Q.device, Q.dtype
        B, n, p, m = Q.shape[0], Q.shape[-1], A.shape[-2], G.shape[-2]
        data = [t.detach().cpu().double().numpy() for t in (Q, c, A, b, G, h)]
        xs, ys = np.zeros((B, n)), np.zeros((B, p + m))
        status, iters = np.zeros(B, dtype=np.int64), np.zeros(B, dtype=np.int64)
        for i in range(B):
            Qi, ci, Ai, bi, Gi, hi = (d[i] for d in data)
            solver = osqp.OSQP()
            solver.setup(P=sp.triu(sp.csc_matrix(Qi), format="csc"), q=ci,
                         A=sp.csc_matrix(np.vstack([Ai, Gi])),
                         l=np.concatenate([bi, np.full(m, -np.inf)]), u=np.concatenate([bi, hi]),
                         **self.settings)
            res = solver.solve(raise_error=False)
            status[i] = _STATUS.get(int(res.info.status_val), QPStatus.NUMERICAL)
            iters[i] = res.info.iter
            if status[i] == QPStatus.SOLVED:
                xs[i], ys[i] = res.x, res.y
        x = torch.as_tensor(xs, dtype=dtype, device=device)
        y = torch.as_tensor(ys, dtype=dtype, device=device)
        lam, mu = y[:, :p], y[:, p:].clamp_min(0)
        slack = h.detach() - (G.detach() @ x.unsqueeze(-1)).squeeze(-1)
        status_t = torch.as_tensor(status, device=device)
        solved = status_t == QPStatus.SOLVED
        active = (slack <= self.active_tol * (1 + h.detach().abs())).to(dtype)
        K = self._kkt(Q.detach(), A.detach(), G.detach() * active[..., None], 1 - active)
        factor = ActiveSetKKTFactor(K, n, p, solved)
        factor.ok = solved & self._nonsingular(factor.LU)
        factor.active = active
        res = torch.zeros(B, dtype=dtype, device=device)
        stats = SolverStats(self.name, torch.as_tensor(iters, device=device), res, solved, evaluations=B)
        stats.extra["status"] = status_t
        return QPSolution(x, lam, mu, slack, status_t, stats, factor)

    @staticmethod
    def derivative_system(sol: QPSolution, G: Tensor, h: Tensor, x: Tensor, mu: Tensor):
        """``(diag(𝟙_𝒜) G, 𝟙 − 𝟙_𝒜, 𝟙_𝒜)``: the active-set derivative KKT matrix."""
        active = sol.factor.active
        return G * active[..., None], 1 - active, active

    @staticmethod
    def _kkt(Q: Tensor, A: Tensor, Ga: Tensor, w: Tensor) -> Tensor:
        B, p, m = Q.shape[0], A.shape[-2], Ga.shape[-2]
        zero = Q.new_zeros
        top = torch.cat([Q, A.mT, Ga.mT], -1)
        mid = torch.cat([A, zero(B, p, p), zero(B, p, m)], -1)
        bot = torch.cat([Ga, zero(B, m, p), torch.diag_embed(-w)], -1)
        return torch.cat([top, mid, bot], -2)

    @staticmethod
    def _nonsingular(LU: Tensor) -> Tensor:
        d = LU.diagonal(dim1=-2, dim2=-1).abs()
        rcond = LU.shape[-1] * torch.finfo(LU.dtype).eps
        return d.amin(-1) > rcond * d.amax(-1)
