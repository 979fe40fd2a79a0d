"""OSQP-backed equality QP: OSQP (with ``l = u = b``) solves the forward problem.

OSQP's Lagrangian uses our sign convention (``Px + q + Aᵀy = 0``), so ``λ = y``. OSQP's own
KKT factorization is not reachable from Python, so the first derivative taken factors
``[[Q, Aᵀ], [A, 0]]`` once with the dense backend's factorization (a forward pass that needs
no derivative factors nothing); the backward, the JVP and double backward reuse it and
differentiate OSQP's solution through the KKT conditions.

CPU-only for the OSQP solve (NumPy/SciPy, one problem of the batch at a time): tensors are
moved to the CPU and the results back to the input device.
"""

from __future__ import annotations

import numpy as np
import osqp
import scipy.sparse as sp
import torch
from torch import Tensor

from implicit_layers.checks import check_policy
from implicit_layers.layers.eq_qp.dense import KKTFactorization, sym
from implicit_layers.linalg.base import Factorization
from implicit_layers.linalg.kkt.equality import factor_kkt
from implicit_layers.solvers.base import SolveResult
from implicit_layers.solvers.qp.osqp import validate_settings
from implicit_layers.stats import SolverStats


class LazyKKTFactorization(Factorization):
    """The dense KKT factorization of the problem OSQP solved, computed on first use: a
    forward pass that needs no derivative factors nothing."""

    def __init__(self, Q: Tensor, A: Tensor, refine: int):
        self.Q, self.A, self.refine = Q, A, refine
        self.stats = None
        self._fac: KKTFactorization | None = None

    def solve(self, b: Tensor, transpose: bool = False) -> Tensor:
        if self._fac is None:
            self._fac = KKTFactorization(factor_kkt(sym(self.Q), self.A), self.Q, self.A,
                                         self.refine)
        return self._fac.solve(b, transpose)


class OSQPBackend:
    """Forward solve by OSQP (``l = u = b``), warm-started from the previous call.

    Args:
        eps_abs, eps_rel: OSQP tolerances (tight by default: the derivative assumes the KKT
            conditions hold).
        max_iter: OSQP's iteration limit.
        warm_start: start each problem of the batch from the previous call's solution
            when the shapes match.
        on_failure: "raise" (ConvergenceError) or "warn" when OSQP does not solve a problem.
        refine: iterative-refinement steps in the derivative solves.
        **settings: further OSQP settings (e.g. ``rho``, ``polishing``).

    >>> import torch, implicit_layers as il
    >>> Q, c = torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> A, b = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    >>> x, lam = il.EqualityQPLayer(OSQPBackend())(Q, c, A, b)
    >>> torch.allclose(x, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-6)
    True
    """

    name = "osqp"
    accepts_sparse = False
    checks_finite = False

    def __init__(self, eps_abs: float = 1e-10, eps_rel: float = 1e-10, max_iter: int = 20000,
                 warm_start: bool = True, on_failure: str = "raise", refine: int = 1, **settings):
        self.on_failure = check_policy(on_failure)
        self.settings = {"verbose": False, "polishing": True, **settings,
                         "eps_abs": eps_abs, "eps_rel": eps_rel, "max_iter": max_iter}
        validate_settings(self.settings)  # ValueError now, not OSQP's exception at the first call
        self.warm_start, self.refine = warm_start, refine
        self._previous: tuple[np.ndarray, np.ndarray] | None = None

    def solve(self, problem, y0: Tensor) -> SolveResult:
        """The layer's forward solve: ``problem.data = (Q, c, A, b)``; returns ``(x; λ)``."""
        Q, c, A, b = problem.data
        x, lam, stats = self._solve(Q, c, A, b)
        y = torch.cat([x, lam], -1)
        return SolveResult(y, stats, LazyKKTFactorization(Q, A, self.refine))

    def _solve(self, Q, c, A, b):
        batch = torch.broadcast_shapes(Q.shape[:-2], c.shape[:-1], A.shape[:-2], b.shape[:-1])
        n, m = Q.shape[-1], A.shape[-2]
        as_np = lambda t, *ev: t.expand(*batch, *ev).reshape(-1, *ev).cpu().double().numpy()  # noqa: E731
        Qs, cs, As, bs = as_np(Q, n, n), as_np(c, n), as_np(A, m, n), as_np(b, m)
        count = cs.shape[0]
        warm = self._previous if self.warm_start else None
        if warm is not None and (warm[0].shape, warm[1].shape) != ((count, n), (count, m)):
            warm = None
        xs, ys = np.zeros((count, n)), np.zeros((count, m))
        iters, res, ok = np.zeros(count, np.int64), np.zeros(count), np.zeros(count, bool)
        for k in range(count):
            P = sp.triu(sp.csc_matrix((Qs[k] + Qs[k].T) / 2), format="csc")
            solver = osqp.OSQP()
            try:
                solver.setup(P, cs[k], sp.csc_matrix(As[k]), bs[k], bs[k], **self.settings)
            except osqp.OSQPException as err:  # data validation or a non-convex KKT matrix
                raise ValueError(f"OSQP rejected problem {k} of the batch (error {err}): Q must be "
                                 f"positive semidefinite and the data finite") from err
            if warm is not None:
                solver.warm_start(x=warm[0][k], y=warm[1][k])
            out = solver.solve(raise_error=False)
            xs[k], ys[k] = out.x, out.y
            iters[k], ok[k] = out.info.iter, out.info.status == "solved"
            res[k] = max(out.info.prim_res, out.info.dual_res)
        self._previous = (xs, ys)
        to = dict(device=c.device)
        stats = SolverStats("OSQP", iterations=torch.as_tensor(iters, **to).reshape(batch),
                            residual=torch.as_tensor(res, dtype=c.dtype, **to).reshape(batch),
                            converged=torch.as_tensor(ok, **to).reshape(batch))
        to["dtype"] = c.dtype
        return (torch.as_tensor(xs, **to).reshape(*batch, n),
                torch.as_tensor(ys, **to).reshape(*batch, m), stats)
