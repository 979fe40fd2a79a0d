"""OSQP forward solver for :class:`~implicit_layers.QPLayer` (CPU; sparse-friendly).

OSQP (ADMM with solution polishing) runs on the CPU in float64, one sample at a time, on
sparse copies of the equilibrated data (its tolerances are absolute): tensors are moved to
NumPy explicitly and the results back to the input's device and dtype. Its form
``l ≤ Ax ≤ u`` takes two-sided constraints natively (equalities are rows with ``l = u``),
and its multipliers have this package's signs.

The slacks are computed in float64 before anything is rounded to the input dtype, so the
active set is identified at OSQP's precision also for float32 inputs. Then the solution goes
through :func:`~implicit_layers.solvers.qp.active_set.derivative_and_polish`, like the
interior point's: the same derivative system, the same polishing, the same optimality test.
OSQP's own errors never reach the caller: a non-convex ``Q`` is a ``ValueError``, invalid
settings are rejected at construction, a numerical failure is a sample's ``NUMERICAL``
status.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from implicit_layers.checks import check_count, check_positive
from implicit_layers.solvers.qp.active_set import derivative_and_polish, narrowed
from implicit_layers.solvers.qp.base import QPSolution, QPSolver, QPStatus
from implicit_layers.solvers.qp.feasibility import infeasible, mark_infeasible
from implicit_layers.solvers.qp.problem import QPProblem
from implicit_layers.stats import SolverStats

_STATUS = {1: QPStatus.SOLVED, 2: QPStatus.MAX_ITER, 3: QPStatus.INFEASIBLE,
           4: QPStatus.INFEASIBLE, 5: QPStatus.UNBOUNDED, 6: QPStatus.UNBOUNDED,
           7: QPStatus.MAX_ITER}


@contextmanager
def _quiet():
    """Silence OSQP's printing (errors go to the caller as exceptions/statuses): its C code
    writes to the file descriptors and, through ``PySys_WriteStdout``, to ``sys.stdout``."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):
        os.dup2(null.fileno(), 1), os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


class OSQP(QPSolver):
    """OSQP forward solver (CPU; sparse) for :class:`~implicit_layers.QPLayer`.

    Args:
        eps_abs, eps_rel: OSQP tolerances (polishing then recovers a near-exact solution).
        max_iter: OSQP's iteration cap.
        tol: the optimality test a solution must pass to be ``SOLVED`` (see
            :func:`~implicit_layers.solvers.qp.active_set.optimality_residual`; default
            ``1e-9`` in float64, ``1e-5`` in float32).
        **settings: passed on to ``osqp.OSQP.setup`` (validated at construction).

    >>> import torch, implicit_layers as il
    >>> Q = torch.eye(2, dtype=torch.float64); c = -torch.ones(2, dtype=torch.float64)
    >>> G = torch.ones(1, 2, dtype=torch.float64); h = torch.ones(1, dtype=torch.float64)
    >>> x, lam, mu = il.QPLayer(solver=il.OSQP())(Q, c, None, None, G, h)
    >>> x.round(decimals=6)
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    name = "OSQP"

    def __init__(self, eps_abs: float = 1e-9, eps_rel: float = 1e-9, max_iter: int = 20000,
                 tol: float | None = None, **settings):
        check_positive("eps_abs", eps_abs, allow_zero=True)
        check_positive("eps_rel", eps_rel, allow_zero=True)
        check_count("max_iter", max_iter)
        check_positive("tol", tol)
        self.settings = {"polishing": True, "verbose": False, **settings, "eps_abs": eps_abs,
                         "eps_rel": eps_rel, "max_iter": max_iter}
        self.tol = tol
        validate_settings(self.settings)

    def solve(self, problem: QPProblem, detect_infeasibility: bool = True) -> QPSolution:
        import osqp

        P = problem
        device, dtype = P.c.device, P.c.dtype
        B, (n, p, m) = P.batch, P.sizes
        Q, c, A, b, G, lo, up = (t.detach().cpu().double().numpy()
                                 for t in (P.Q, P.c, P.A, P.b, P.G, P.lower, P.upper))
        _check_convex(Q)
        # OSQP's tolerances are absolute: it solves the equilibrated problem (data of order
        # one), whose solution is mapped back; raw data scaled by 1e-8 gave points 4-7 % off
        P64 = P.to(torch.float64)
        scaled, scaling = P64.equilibrated()
        Qs, cs, As, bs, Gs, los, ups = (t.detach().cpu().numpy() for t in (
            scaled.Q, scaled.c, scaled.A, scaled.b, scaled.G, scaled.lower, scaled.upper))
        xs, ys = np.zeros((B, n)), np.zeros((B, p + m))
        status, iters = np.zeros(B, dtype=np.int64), np.zeros(B, dtype=np.int64)
        for i in range(B):
            data = dict(P=sp.triu(sp.csc_matrix(Qs[i]), format="csc"), q=cs[i],
                        A=sp.csc_matrix(np.vstack([As[i], Gs[i]])),
                        l=np.concatenate([bs[i], los[i]]), u=np.concatenate([bs[i], ups[i]]))
            res = _run(osqp, data, self.settings)
            if res is not None and _STATUS.get(int(res.info.status_val)) == QPStatus.INFEASIBLE:
                # OSQP's certificate test fired on feasible (degenerate) problems: once more
                # with a 100× tighter certificate tolerance; the claim is confirmed below
                strict = self.settings.get("eps_prim_inf", 1e-4) * 1e-2
                res = _run(osqp, data, {**self.settings, "eps_prim_inf": strict}) or res
            if res is None:  # a numerical failure of setup (e.g. huge values)
                status[i] = QPStatus.NUMERICAL
                continue
            status[i] = _STATUS.get(int(res.info.status_val), QPStatus.NUMERICAL)
            iters[i] = res.info.iter
            if status[i] in (QPStatus.SOLVED, QPStatus.MAX_ITER) and np.isfinite(res.x).all():
                xs[i], ys[i] = res.x, res.y
            elif status[i] in (QPStatus.SOLVED, QPStatus.MAX_ITER):
                status[i] = QPStatus.NUMERICAL
        tol = self.tol if self.tol is not None else (1e-9 if dtype == torch.float64 else 1e-5)
        claimed = np.nonzero(status == QPStatus.INFEASIBLE)[0]
        if claimed.size and detect_infeasibility:  # a claim stands if the least-norm shift is nonzero
            shifted = infeasible(self, P.select(torch.as_tensor(claimed, device=device)), tol)
            status[claimed[~shifted.cpu().numpy()]] = QPStatus.MAX_ITER
        x64, lam64, mu64 = scaling.unscale(*(torch.as_tensor(v, device=device) for v in (
            xs, ys[:, :p], ys[:, p:])))
        xs = x64.cpu().numpy()
        Gx = np.einsum("bmn,bn->bm", G, xs)
        to: dict[str, Any] = dict(dtype=dtype, device=device)
        x, y = x64.to(dtype), torch.cat([lam64, mu64], -1).to(dtype)
        slack_u, slack_l = torch.as_tensor(up - Gx, **to), torch.as_tensor(Gx - lo, **to)
        status_t = torch.as_tensor(status, device=device)
        stats = SolverStats(self.name, torch.as_tensor(iters, device=device),
                            torch.full((B,), float("inf"), **to), status_t == QPStatus.SOLVED,
                            evaluations=B)
        stats.extra["status"] = status_t
        sol = QPSolution(x, y[:, :p], y[:, p:], status_t, stats)
        # the derivative system and polishing in float64, like the solve (see InteriorPoint)
        sol64 = QPSolution(x64, lam64, mu64, sol.status, sol.stats)
        sol = narrowed(P, derivative_and_polish(P64, sol64, slack_u.double(), slack_l.double(),
                                                scaled, scaling, None, 1e-9, tol), tol)
        if detect_infeasibility:
            mark_infeasible(self, P, sol.status, tol)
        return sol


def validate_settings(settings: dict) -> None:
    """Run OSQP's own settings check on a one-variable problem: ``ValueError`` naming the
    settings instead of OSQP's exception."""
    import osqp

    one = sp.csc_matrix(np.ones((1, 1)))
    try:
        with _quiet():
            osqp.OSQP().setup(P=one, q=np.zeros(1), A=one, l=-np.ones(1), u=np.ones(1), **settings)
    except Exception as err:  # OSQPException, ValueError, TypeError
        raise ValueError(f"invalid OSQP settings {settings}: {err}") from err


def _run(osqp, data: dict, settings: dict):
    """One OSQP solve of ``data`` (``P, q, A, l, u``), silenced; None if setup or solve
    raised (e.g. huge values)."""
    try:
        with _quiet():
            solver = osqp.OSQP()
            solver.setup(**data, **settings)
            return solver.solve(raise_error=False)
    except Exception:
        return None


def _check_convex(Q: np.ndarray) -> None:
    """``ValueError`` when some ``Q`` has a clearly negative eigenvalue (OSQP would fail)."""
    sym = (Q + Q.transpose(0, 2, 1)) / 2
    low = np.linalg.eigvalsh(sym)[:, 0] if sym.shape[-1] else np.zeros(len(sym))
    scale = np.abs(sym).reshape(len(sym), -1).max(-1, initial=0.0)
    bad = low < -1e-9 * (1 + scale)
    if bad.any():
        raise ValueError(f"Q must be positive semidefinite (a convex QP): the smallest "
                         f"eigenvalue is {low.min():.3e} in {int(bad.sum())} of {len(bad)} "
                         f"samples")
