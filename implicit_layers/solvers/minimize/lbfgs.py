"""Batched L-BFGS with a strong Wolfe line search and per-sample stopping.

Each sample keeps its own curvature pairs ``(s, v) = (y_{k+1} − y_k, ∇f_{k+1} − ∇f_k)`` in a
shared circular buffer with a per-sample validity mask, and its direction is the two-loop
recursion ``d = −H ∇f`` with ``H₀ = γ I``, ``γ = sᵀv / vᵀv`` of its newest pair (Nocedal &
Wright, Algorithm 7.4). A pair enters only when ``sᵀv > 0`` (which the curvature condition
of the line search guarantees in exact arithmetic), so ``H`` stays positive definite and
``d`` a descent direction. A sample whose line search finds no decrease restarts from
steepest descent; if that fails too it stops, reported as not converged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.solvers.base import RootProblem, SolveResult
from implicit_layers.solvers.minimize.base import GradientLog, Minimizer, Objective
from implicit_layers.solvers.minimize.line_search import strong_wolfe
from implicit_layers.stats import check_finite_iterate


class _Pairs:
    """The last ``m`` curvature pairs of every sample and the two-loop recursion."""

    def __init__(self, B: int, n: int, m: int, like: Tensor):
        self.s = like.new_zeros(m, B, n)
        self.v = like.new_zeros(m, B, n)
        self.rho = like.new_zeros(m, B)  # 1 / sᵀv where valid, 0 elsewhere
        self.gamma = like.new_ones(B)
        self.slot, self.count, self.m = 0, 0, m

    def empty(self) -> Tensor:
        return ~(self.rho != 0).any(0)

    def direction(self, g: Tensor) -> Tensor:
        """``−H g`` per sample (steepest descent for samples without pairs)."""
        order = [(self.slot - 1 - i) % self.m for i in range(self.count)]  # newest first
        q, alphas = g, []
        for i in order:
            a = self.rho[i] * (self.s[i] * q).sum(-1)
            q = q - a[:, None] * self.v[i]
            alphas.append(a)
        r = self.gamma[:, None] * q
        for i, a in zip(reversed(order), reversed(alphas)):
            b = self.rho[i] * (self.v[i] * r).sum(-1)
            r = r + (a - b)[:, None] * self.s[i]
        return -r

    def push(self, s: Tensor, v: Tensor, accept: Tensor) -> None:
        """Store the pair of the samples in ``accept`` whose curvature ``sᵀv`` is positive."""
        sv, vv = (s * v).sum(-1), (v * v).sum(-1)
        tiny = torch.finfo(s.dtype).eps * s.norm(dim=-1) * v.norm(dim=-1)
        keep = accept & (sv > tiny) & (vv > 0)
        self.s[self.slot] = s
        self.v[self.slot] = v
        self.rho[self.slot] = torch.where(keep, 1 / torch.where(keep, sv, torch.ones_like(sv)), 0)
        self.gamma = torch.where(keep, sv / torch.where(keep, vv, torch.ones_like(vv)), self.gamma)
        self.slot = (self.slot + 1) % self.m
        self.count = min(self.count + 1, self.m)

    def reset(self, mask: Tensor) -> None:
        self.rho = torch.where(mask, 0, self.rho)
        self.gamma = torch.where(mask, 1, self.gamma)


class LBFGS(Minimizer):
    """Limited-memory BFGS for ``min_y f(x, y)``, batched with per-sample stopping.

    A sample converges when ``‖∇f‖ ≤ tol + rtol · ‖∇f(y₀)‖``. The first step of a sample without
    curvature pairs has length ``min(1, 1/‖∇f‖)`` along ``−∇f``; later trials start at the
    quasi-Newton step ``alpha = 1``.

    Args:
        memory: curvature pairs kept per sample.
        tol, rtol, max_iter: see :class:`~implicit_layers.RootSolver` (``max_iter`` default
            500 iterations).
        c1, c2: the constants of the strong Wolfe conditions (``0 < c1 < c2 < 1``).
        max_line_search: batched evaluations per line search.

    The stats count batched objective+gradient evaluations in ``evaluations``, and mark
    samples that stopped without a descent step in ``extra["stalled"]``.

    >>> import torch, implicit_layers as il
    >>> rosenbrock = lambda x, y: (1 - y[..., 0]) ** 2 + 100 * (y[..., 1] - y[..., 0] ** 2) ** 2
    >>> layer = il.ArgminLayer(rosenbrock, solver=il.LBFGS())
    >>> y = layer(torch.zeros((), dtype=torch.float64), torch.tensor([-1.2, 1.0]).double())
    >>> y.round(decimals=9), layer.stats.forward.all_converged
    (tensor([1., 1.], dtype=torch.float64), True)
    """

    name = "LBFGS"
    default_max_iter = 500

    def __init__(self, memory: int = 10, tol=None, rtol=None, max_iter=None, c1: float = 1e-4,
                 c2: float = 0.9, max_line_search: int = 20):
        super().__init__(tol, rtol, max_iter)
        if int(memory) != memory or memory < 1:
            raise ValueError(f"memory must be a positive integer, got {memory}")
        if not 0 < c1 < c2 < 1:
            raise ValueError(f"need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
        if int(max_line_search) != max_line_search or max_line_search < 1:
            raise ValueError(f"max_line_search must be a positive integer, got {max_line_search}")
        self.memory, self.c1, self.c2 = int(memory), c1, c2
        self.max_line_search = int(max_line_search)

    def solve(self, problem: RootProblem, y0: Tensor) -> SolveResult:
        obj = Objective(problem, y0, self.name)
        y = obj.flat(y0)
        f, g = obj.value_and_grad(y)
        log = GradientLog(self, problem, obj.unflat(g))
        pairs = _Pairs(obj.B, obj.n, self.memory, y)
        stalled = torch.zeros(obj.B, dtype=torch.bool, device=y.device)
        for k in range(self.max_iter):
            active = log.active.reshape(obj.B) & ~stalled
            if not bool(active.any()):
                break
            d = pairs.direction(g)
            uphill = ~((g * d).sum(-1) < 0)  # rounding can spoil a direction: restart those
            pairs.reset(uphill)
            d = torch.where(uphill[:, None], -g, d)
            fresh = pairs.empty()
            alpha0 = torch.where(fresh, (1 / g.norm(dim=-1)).clamp(max=1.0), torch.ones_like(f))
            ls = strong_wolfe(obj.value_and_grad, y, f, g, d, alpha0, active, self.c1, self.c2,
                              self.max_line_search)
            step = ls.alpha[:, None] * d
            pairs.push(step, ls.g - g, ls.decrease)
            stalled = stalled | (active & ~ls.decrease & fresh)  # steepest descent failed
            pairs.reset(active & ~ls.decrease)
            y = torch.where(ls.decrease[:, None], y + step, y)
            f = torch.where(ls.decrease, ls.f, f)
            g = torch.where(ls.decrease[:, None], ls.g, g)
            check_finite_iterate(y, self.name, k + 1)
            log.update(obj.unflat(g), active.reshape(log.res.shape),
                       evaluations=ls.evaluations)
        stats = log.stats(stalled=stalled.reshape(log.res.shape))
        stats.evaluations = obj.evaluations
        return SolveResult(obj.unflat(y), stats)

    def __repr__(self) -> str:
        return (f"LBFGS(memory={self.memory}, tol={self.tol}, rtol={self.rtol}, "
                f"max_iter={self.max_iter})")
