"""OSQP-backed equality QP: OSQP (with ``l = u = b``) solves the forward problem.

OSQP's Lagrangian uses our sign convention (``Px + q + Aᵀy = 0``), so ``λ = y``. OSQP's own
KKT factorization is not reachable from Python, so when a derivative will be needed the
forward also factors ``[[Q, Aᵀ], [A, 0]]`` once with the dense backend's factorization; the
backward, the JVP and double backward reuse that factorization (never factoring again) and
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
from torch.autograd import Function, forward_ad

from implicit_layers.core.checks import check_policy
from implicit_layers.layers.eq_qp.dense import _FactoredKKTSolve, sym
from implicit_layers.linalg.kkt.equality import factor_kkt
from implicit_layers.stats import SolverStats, enforce


class _GivenSolution(Function):
    """``(refine, kind, Q, A, p, q, x, λ, *factors) -> (x, λ)``: passes an external
    solver's solution of ``K (x; λ) = (p; q)`` through, differentiated like
    ``_FactoredKKTSolve`` (same saved tensors, same pullback and pushforward, same
    factors)."""

    @staticmethod
    def forward(refine, kind, Q, A, p, q, x, lam, *factors):
        return x.clone(), lam.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        refine, kind, Q, A, p, q, _x, _lam, *factors = inputs
        _FactoredKKTSolve.setup_context(ctx, (refine, kind, Q, A, p, q, *factors), output)

    @staticmethod
    def backward(ctx, x_bar, lam_bar):
        grads = _FactoredKKTSolve.backward(ctx, x_bar, lam_bar)
        return grads[:6] + (None, None) + grads[6:]

    @staticmethod
    def jvp(ctx, refine, kind, Q_dot, A_dot, p_dot, q_dot, _x_dot, _lam_dot, *factors):
        return _FactoredKKTSolve.jvp(ctx, refine, kind, Q_dot, A_dot, p_dot, q_dot, *factors)


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

    >>> import torch
    >>> Q, c = torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> A, b = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    >>> x, lam = OSQPBackend()(Q, c, A, b)
    >>> torch.allclose(x, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-6)
    True
    """

    name = "osqp"

    def __init__(self, eps_abs: float = 1e-10, eps_rel: float = 1e-10, max_iter: int = 20000,
                 warm_start: bool = True, on_failure: str = "raise", refine: int = 1, **settings):
        self.on_failure = check_policy(on_failure)
        self.settings = {"verbose": False, "polishing": True, **settings,
                         "eps_abs": eps_abs, "eps_rel": eps_rel, "max_iter": max_iter}
        self.warm_start, self.refine = warm_start, refine
        self._previous: tuple[np.ndarray, np.ndarray] | None = None
        self.stats: SolverStats | None = None

    def __call__(self, Q: Tensor, c: Tensor, A: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (Q, c, A, b)):
            raise NotImplementedError("the OSQP backend does not support torch.func "
                                      "transforms; use backend='dense'")
        x, lam = self._solve(Q.detach(), c.detach(), A.detach(), b.detach())
        if not _needs_derivative(Q, c, A, b):
            return x, lam
        fac = factor_kkt(sym(Q.detach()), A.detach())  # no gradient: carried by the solve
        return _GivenSolution.apply(self.refine, type(fac), Q, A, -c, b, x, lam, *fac.tensors)

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
            solver.setup(P, cs[k], sp.csc_matrix(As[k]), bs[k], bs[k], **self.settings)
            if warm is not None:
                solver.warm_start(x=warm[0][k], y=warm[1][k])
            out = solver.solve(raise_error=False)
            xs[k], ys[k] = out.x, out.y
            iters[k], ok[k] = out.info.iter, out.info.status == "solved"
            res[k] = max(out.info.prim_res, out.info.dual_res)
        self._previous = (xs, ys)
        self.stats = enforce(SolverStats(
            "OSQP", iterations=torch.as_tensor(iters).reshape(batch),
            residual=torch.as_tensor(res).reshape(batch),
            converged=torch.as_tensor(ok).reshape(batch)), self.on_failure, "OSQP forward solve")
        to = dict(dtype=c.dtype, device=c.device)
        return (torch.as_tensor(xs, **to).reshape(*batch, n),
                torch.as_tensor(ys, **to).reshape(*batch, m))


def _needs_derivative(*tensors: Tensor) -> bool:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)
