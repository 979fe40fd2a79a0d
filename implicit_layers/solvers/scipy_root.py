"""A wrapper around ``scipy.optimize.root`` (CPU, float64; data moved explicitly)."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.optimize
import torch

from implicit_layers.solvers.base import (
    FlatProblem,
    IterationLog,
    RootProblem,
    RootSolver,
    SolveResult,
)


class ScipyRoot(RootSolver):
    """Solve with ``scipy.optimize.root`` on the CPU.

    The whole batch is one SciPy system whose Jacobian is the block-diagonal matrix of the
    per-sample blocks; iterates are copied to the residual's device and dtype for every
    evaluation and back to NumPy float64 (this backend is for small CPU problems and for
    cross-checking). Per-sample stats come from the final residuals.

    Args:
        method: any method of ``scipy.optimize.root`` (default ``"hybr"``).
        use_jacobian: pass the exact Jacobian (from batched VJPs) to SciPy.
        tol, rtol, max_iter: see :class:`RootSolver`; ``max_iter`` bounds SciPy's evaluations
            (``hybr``, ``lm``) or iterations (the other methods); 0 returns ``y0`` unchanged
            (converged only if it meets the tolerance) without calling SciPy.

    >>> import torch
    >>> from implicit_layers.solvers.base import RootProblem
    >>> prob = RootProblem(lambda y: y ** 3 - 8.0)
    >>> ScipyRoot().solve(prob, torch.ones(1, dtype=torch.float64)).y
    tensor([2.], dtype=torch.float64)
    """

    name = "scipy.optimize.root"
    default_max_iter = 1000
    methods = ("hybr", "lm", "broyden1", "broyden2", "anderson", "linearmixing",
               "diagbroyden", "excitingmixing", "krylov", "df-sane")

    def __init__(self, method: str = "hybr", use_jacobian: bool = True, tol=None, rtol=None,
                 max_iter=None):
        super().__init__(tol, rtol, max_iter)
        if method not in self.methods:
            raise ValueError(f"method must be one of {self.methods}, got {method!r}")
        self.method, self.use_jacobian = method, use_jacobian

    def solve(self, problem: RootProblem, y0) -> SolveResult:
        flat = FlatProblem(problem, y0)
        device, dtype = y0.device, y0.dtype
        log = IterationLog(self, flat, flat.y0_flat, flat.f(flat.y0_flat))
        if log.finished or self.max_iter == 0:  # SciPy reads a budget of 0 as "its default"
            return SolveResult(flat.result(flat.y0_flat), log.stats(message="not called"))
        calls = {"f": 0}

        def to_torch(v: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(v, dtype=dtype).reshape(flat.B, flat.n).to(device)

        def fun(v: np.ndarray) -> np.ndarray:
            calls["f"] += 1
            return flat.f(to_torch(v)).detach().cpu().double().numpy().ravel()

        def jac(v: np.ndarray) -> np.ndarray:
            blocks = flat.jacobian(to_torch(v)).detach().cpu().double().numpy()
            return scipy.linalg.block_diag(*blocks)

        tol, _ = self.tolerances(torch.float64)
        options = {"maxfev": self.max_iter} if self.method == "hybr" \
            else {"maxiter": self.max_iter}
        sol = scipy.optimize.root(
            fun, flat.y0_flat.detach().cpu().double().numpy().ravel(), method=self.method,
            jac=jac if self.use_jacobian and self.method in ("hybr", "lm") else None, tol=tol,
            options=options,
        )
        y = to_torch(sol.x)
        log.update(y, flat.f(y), None, 1, evaluations=calls["f"])  # SciPy moved every sample
        stats = log.stats(message=sol.message, success=bool(sol.success))
        stats.iterations = torch.full_like(stats.iterations, int(getattr(sol, "nfev", calls["f"])))
        return SolveResult(flat.unflat(y), stats)
