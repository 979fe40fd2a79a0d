"""Line-search Newton-CG (truncated Newton) on Hessian-vector products, batched.

Each iteration solves ``∇²f d = −∇f`` inexactly by CG, stopping at the forcing tolerance
``‖∇²f d + ∇f‖ ≤ min(½, √‖∇f‖) ‖∇f‖`` (superlinear convergence near a minimizer) or at the
first direction of non-positive curvature, where the iterate so far — or ``−∇f`` if CG had not
moved yet — is still a descent direction (Nocedal & Wright, Algorithm 7.1). A sample whose
line search finds no decrease along the Newton direction tries ``−∇f`` next; failing that
too, it stops (reported as not converged). The Hessian is
never formed: every product is a reverse-over-reverse pass through one recorded gradient
graph per iteration. The step length comes from the strong Wolfe line search, starting at 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.solvers.base import RootProblem, SolveResult
from implicit_layers.solvers.minimize.base import GradientLog, Minimizer, Objective
from implicit_layers.solvers.minimize.cg import conjugate_gradient
from implicit_layers.solvers.minimize.line_search import strong_wolfe
from implicit_layers.stats import check_finite_iterate


class NewtonCG(Minimizer):
    """Truncated Newton: CG on Hessian-vector products for the step, a Wolfe line search
    for its length; batched with per-sample stopping.

    Args:
        tol, rtol, max_iter: see :class:`~implicit_layers.RootSolver` (``max_iter`` default
            100 Newton iterations).
        cg_max_iter: CG iterations per Newton step (default ``2 n``).
        c1, c2: the strong Wolfe constants; max_line_search: evaluations per line search.

    The stats record the Hessian-vector products in ``extra["hessian_products"]`` and the
    samples that met negative curvature in ``extra["negative_curvature"]``.

    >>> import torch, implicit_layers as il
    >>> f = lambda x, y: (torch.cosh(y - x)).sum(-1)                 # minimum at y = x
    >>> x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    >>> il.ArgminLayer(f, solver=il.NewtonCG())(x, torch.zeros_like(x)).round(decimals=9)
    tensor([[ 1., -2.]], dtype=torch.float64)
    """

    name = "NewtonCG"
    default_max_iter = 100

    def __init__(self, tol=None, rtol=None, max_iter=None, cg_max_iter: int | None = None,
                 c1: float = 1e-4, c2: float = 0.9, max_line_search: int = 20):
        super().__init__(tol, rtol, max_iter)
        if not 0 < c1 < c2 < 1:
            raise ValueError(f"need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
        self.cg_max_iter, self.c1, self.c2 = cg_max_iter, c1, c2
        self.max_line_search = int(max_line_search)

    def solve(self, problem: RootProblem, y0: Tensor) -> SolveResult:
        obj = Objective(problem, y0, self.name)
        y = obj.flat(y0)
        f, g, hvp = obj.linearize(y)
        log = GradientLog(self, problem, obj.unflat(g))
        stalled = torch.zeros(obj.B, dtype=torch.bool, device=y.device)
        negative, retry = torch.zeros_like(stalled), torch.zeros_like(stalled)
        products = 0
        cg_max_iter = self.cg_max_iter if self.cg_max_iter is not None else 2 * obj.n
        for k in range(self.max_iter):
            active = log.active.reshape(obj.B) & ~stalled
            if not bool(active.any()):
                break
            gnorm = g.norm(dim=-1)
            forcing = torch.minimum(torch.full_like(gnorm, 0.5), gnorm.sqrt()) * gnorm
            rhs = torch.where(active[:, None], -g, 0)
            cg = conjugate_gradient(hvp, rhs, forcing, cg_max_iter)
            products += cg.products
            negative = negative | (active & cg.negative_curvature)
            newton = ((cg.x * g).sum(-1) < 0) & ~retry
            d = torch.where(newton[:, None], cg.x, -g)
            ls = strong_wolfe(obj.value_and_grad, y, f, g, d, torch.ones_like(f), active,
                              self.c1, self.c2, self.max_line_search)
            failed = active & ~ls.decrease
            stalled = stalled | (failed & ~newton)  # not even steepest descent decreased f
            retry = failed & newton  # the next step of these samples goes along −∇f
            y = torch.where(ls.decrease[:, None], y + ls.alpha[:, None] * d, y)
            check_finite_iterate(y, self.name, k + 1)
            f, g, hvp = obj.linearize(y)
            log.update(obj.unflat(g), active.reshape(log.res.shape),
                       evaluations=ls.evaluations + 1)
        shape = log.res.shape
        stats = log.stats(stalled=stalled.reshape(shape), negative_curvature=negative.reshape(shape),
                          hessian_products=products)
        stats.evaluations = obj.evaluations
        return SolveResult(obj.unflat(y), stats)

    def __repr__(self) -> str:
        return f"NewtonCG(tol={self.tol}, rtol={self.rtol}, max_iter={self.max_iter})"
