"""A wrapper around ``scipy.optimize.root`` (CPU, float64; data moved explicitly)."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.optimize
import torch

from implicit_layers.solvers.base import IterationLog, RootProblem, RootSolver, SolveResult


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
            where the method supports it.

    >>> import torch
    >>> from implicit_layers.solvers.base import RootProblem
    >>> prob = RootProblem(lambda y: y ** 3 - 8.0)
    >>> ScipyRoot().solve(prob, torch.ones(1, dtype=torch.float64)).y
    tensor([2.], dtype=torch.float64)
    """

    name = "scipy.optimize.root"
    default_max_iter = 1000

    def __init__(self, method: str = "hybr", use_jacobian: bool = True, tol=None, rtol=None,
                 max_iter=None):
        super().__init__(tol, rtol, max_iter)
        self.method, self.use_jacobian = method, use_jacobian

    def solve(self, problem: RootProblem, y0) -> SolveResult:
        shape, device, dtype = y0.shape, y0.device, y0.dtype
        log = IterationLog(self, problem, y0, problem.residual(y0))
        B, n = problem.flatten(y0).shape
        calls = {"f": 0}

        def to_torch(v: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(v, dtype=dtype).reshape(shape).to(device)

        def fun(v: np.ndarray) -> np.ndarray:
            calls["f"] += 1
            return problem.residual(to_torch(v)).detach().cpu().double().numpy().ravel()

        def jac(v: np.ndarray) -> np.ndarray:
            blocks = problem.jacobian(to_torch(v)).reshape(B, n, n).detach().cpu().double().numpy()
            return scipy.linalg.block_diag(*blocks)

        tol, _ = self.tolerances(torch.float64)
        options = {"maxfev": self.max_iter} if self.method == "hybr" else {"maxiter": self.max_iter}
        sol = scipy.optimize.root(
            fun, y0.detach().cpu().double().numpy().ravel(), method=self.method,
            jac=jac if self.use_jacobian else None, tol=tol, options=options,
        )
        y = to_torch(sol.x)
        active = torch.ones_like(log.done)
        log.update(y, problem.residual(y), active, evaluations=calls["f"])
        log.iterations = torch.full_like(log.iterations, int(getattr(sol, "nfev", calls["f"])))
        return SolveResult(y, log.stats(message=sol.message, success=bool(sol.success)))
