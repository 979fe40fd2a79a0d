"""A wrapper around ``scipy.optimize.minimize`` (CPU, float64; data moved explicitly)."""

from __future__ import annotations

import math

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from implicit_layers.solvers.base import RootProblem, SolveResult
from implicit_layers.solvers.minimize.base import GradientLog, Minimizer, Objective

#: methods that use the gradient; those with a gradient tolerance ``gtol``; those that take
#: Hessian-vector products
_GRADIENT = {"BFGS", "CG", "L-BFGS-B", "Newton-CG", "TNC", "SLSQP", "trust-ncg",
             "trust-krylov", "trust-constr"}
_GTOL = {"BFGS", "CG", "L-BFGS-B", "TNC", "trust-ncg", "trust-krylov", "trust-constr"}
_HESSP = {"Newton-CG", "trust-ncg", "trust-krylov", "trust-constr"}


class ScipyMinimize(Minimizer):
    """Minimize with ``scipy.optimize.minimize`` on the CPU.

    The whole batch is one SciPy problem, the sum of the per-sample objectives (separable, so
    its minimizer is every sample's minimizer); each evaluation copies the iterate to the
    objective's device and dtype and the value and gradient back to NumPy float64. Gradient
    methods receive the exact gradient, Newton-type methods (``Newton-CG``, ``trust-ncg``,
    ``trust-krylov``, ``trust-constr``) Hessian-vector products too. Per-sample stats come
    from the final gradients, with the solver's own criterion applied, so a sample SciPy
    left above tolerance is reported as not converged. For small CPU problems and
    cross-checking; :class:`~implicit_layers.LBFGS` is the batched solver.

    Args:
        method: any method of ``scipy.optimize.minimize`` (default ``"L-BFGS-B"``).
        options: extra SciPy options (the gradient tolerance and ``maxiter`` are set from
            ``tol`` and ``max_iter`` unless given here).
        tol, rtol, max_iter: see :class:`~implicit_layers.RootSolver`; the default
            tolerances are ``sqrt(eps)`` of the dtype (1.5e-8 in float64), not ``eps**0.75``:
            SciPy's line searches judge steps by objective values, which stop resolving
            progress at about that gradient norm.

    >>> import torch, implicit_layers as il
    >>> f = lambda x, y: ((y - x) ** 2).sum(-1) + (y ** 4).sum(-1)
    >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    >>> y = il.ArgminLayer(f, solver=il.ScipyMinimize("BFGS"))(x, torch.zeros_like(x))
    >>> torch.allclose(2 * (y - x) + 4 * y ** 3, torch.zeros_like(y), atol=1e-9)
    True
    """

    name = "scipy.optimize.minimize"
    default_max_iter = 1000

    def __init__(self, method: str = "L-BFGS-B", options: dict | None = None, tol=None,
                 rtol=None, max_iter=None):
        super().__init__(tol, rtol, max_iter)
        if method in ("dogleg", "trust-exact"):
            raise ValueError(f"method {method!r} needs the full Hessian; use 'trust-ncg', "
                             "'trust-krylov' or 'Newton-CG' (Hessian-vector products)")
        self.method, self.options = method, dict(options or {})

    def solve(self, problem: RootProblem, y0: Tensor) -> SolveResult:
        obj = Objective(problem, y0, self.name)
        device, dtype = y0.device, y0.dtype
        f0, g0 = obj.value_and_grad(obj.flat(y0))
        log = GradientLog(self, problem, obj.unflat(g0))
        if not bool(log.active.any()):
            return SolveResult(y0, log.stats())

        def to_torch(v: np.ndarray) -> Tensor:
            return torch.as_tensor(v, dtype=dtype).reshape(obj.B, obj.n).to(device)

        def fun(v: np.ndarray):
            f, g = obj.value_and_grad(to_torch(v))
            return float(f.sum()), g.detach().cpu().double().numpy().ravel()

        def hessp(v: np.ndarray, p: np.ndarray) -> np.ndarray:
            _, _, hvp = obj.linearize(to_torch(v))
            return hvp(to_torch(p)).detach().cpu().double().numpy().ravel()

        uses_gradient = self.method in _GRADIENT
        sol = scipy.optimize.minimize(
            fun if uses_gradient else (lambda v: fun(v)[0]),
            y0.detach().cpu().double().numpy().ravel(), method=self.method,
            jac=True if uses_gradient else None,
            hessp=hessp if self.method in _HESSP else None, options=self._options(obj.n, dtype))
        y = to_torch(sol.x)
        _, g = obj.value_and_grad(y)
        log.update(obj.unflat(g), torch.ones_like(log.done))  # SciPy moved every sample
        log.done = log.converged(log.res)  # judged afresh at y
        log.iterations = torch.full_like(log.iterations, int(getattr(sol, "nit", 0)))
        stats = log.stats(message=str(sol.message), success=bool(sol.success))
        stats.evaluations = obj.evaluations
        return SolveResult(obj.unflat(y), stats)

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        default = torch.finfo(dtype).eps ** 0.5
        return (self.tol if self.tol is not None else default,
                self.rtol if self.rtol is not None else default)

    def _options(self, n: int, dtype: torch.dtype) -> dict:
        """SciPy's gradient tolerance (its norms are over the whole batch: the ∞-norm bound
        ``tol / √n`` keeps each sample's 2-norm under ``tol``) and iteration budget."""
        tol, _ = self.tolerances(dtype)
        options: dict[str, float] = {"maxfun" if self.method == "TNC" else "maxiter": self.max_iter}
        if self.method in _GTOL:
            options["gtol"] = tol / math.sqrt(max(n, 1))
        if self.method == "L-BFGS-B":
            options["ftol"] = 0.0  # stop on the gradient, not on a stalled decrease
        return {**options, **self.options}

    def __repr__(self) -> str:
        return f"ScipyMinimize({self.method!r}, tol={self.tol}, max_iter={self.max_iter})"
