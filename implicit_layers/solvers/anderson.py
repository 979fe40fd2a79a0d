"""Anderson acceleration of the fixed-point map ``g(y) = y + f(y)`` (type II, difference form).

With residuals ``f_k = g(y_k) − y_k`` and the last ``m`` differences ``ΔF = [f_{i+1} − f_i]``,
``ΔY = [y_{i+1} − y_i]``, each step solves the small regularized least-squares problem

    γ = argmin ‖f_k − ΔF γ‖² + λ · s · ‖γ‖²,      s = mean diag(ΔFᵀΔF)

and moves to ``y_{k+1} = y_k + β f_k − (ΔY + β ΔF) γ`` (``β`` = damping; ``β = 1`` gives the
classic ``g(y_k) − ΔG γ``). Scaling the problem by ``c`` scales ``ΔFᵀΔF`` and ``s`` by ``c²``,
so ``γ`` — and the iteration — is unchanged: the regularization is scale invariant. λ is
floored at ``1000 · eps`` of the dtype: rounding in the Gram matrix (about ``eps`` relative)
then moves γ along directions the differences do not span (dependent differences) by about
0.1 % of its size, where an unregularized solve would return noise.

Cost per iteration, besides the one evaluation of ``g``: the Gram matrix ``ΔFᵀΔF`` and the
right-hand side ``ΔFᵀ f_k`` are updated incrementally — one batched product of the stored
differences with the two new vectors ``(Δf, f_{k+1})`` gives the new row and column and the
next right-hand side (O(B·m·n) instead of O(B·m²·n)) — and the ``m × m`` systems are solved in
float64. Finiteness is checked once per iteration, on the overflow-safe residual and iterate
norms of :class:`~implicit_layers.solvers.base.IterationLog`, which is also the only value
read from the device per iteration.

Safeguard: a sample whose normal equations are not finite (an overflowing Gram matrix), or
whose coefficients are not, takes a plain damped Picard step and restarts its history (counted
in ``stats.extra["restarts"]``).

On the CPU the small systems go to NumPy's batched ``solve``, which loops over the batch on the
calling thread: torch's batched CPU Cholesky/LU enter an intra-op parallel region (``tril``,
``getrf``) on every call, and each such call stalled for a scheduler time slice (7–16 ms against
~0.03 ms of work, measured on a 2-core machine with the other core busy). On CUDA they stay in
torch (``cholesky_ex``, no synchronization).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor

from implicit_layers.solvers.base import (
    FlatProblem,
    IterationLog,
    RootProblem,
    RootSolver,
    SolveResult,
    where_active,
)


class Anderson(RootSolver):
    """Anderson-accelerated fixed-point iteration, batched with per-sample stopping.

    Args:
        m: memory, the number of past differences used by each step.
        regularization: λ, relative to the mean squared norm of the stored residual
            differences (default ``sqrt(eps)`` of the dtype; floored at ``1000 · eps``).
        damping: β in ``(0, 1]``, the weight of ``g`` in each mixing step.
        tol, rtol, max_iter: see :class:`RootSolver`.

    The stats record the per-sample residual trace, iteration counts, the converged mask, the
    number of batched map evaluations and, in ``extra["restarts"]``, how many safeguarded
    restarts each sample took.

    >>> import torch
    >>> from implicit_layers.solvers.base import RootProblem
    >>> prob = RootProblem(lambda y: torch.cos(y) - y)      # fixed point of cos
    >>> res = Anderson(m=3).solve(prob, torch.zeros(2, 1, dtype=torch.float64))
    >>> round(float(res.y[0, 0]), 6), bool(res.stats.all_converged)
    (0.739085, True)
    """

    name = "Anderson"
    default_max_iter = 100

    def __init__(self, m: int = 5, regularization: float | None = None, damping: float = 1.0,
                 tol=None, rtol=None, max_iter=None):
        super().__init__(tol, rtol, max_iter)
        if isinstance(m, bool) or int(m) != m or m < 1:
            raise ValueError(f"m must be a positive integer, got {m}")
        if regularization is not None and not 0.0 <= regularization < float("inf"):
            raise ValueError(f"regularization must be a finite number >= 0, got {regularization}")
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"damping must lie in (0, 1], got {damping}")
        self.m, self.regularization, self.damping = int(m), regularization, damping

    @torch.no_grad()  # a forward solver runs outside autograd (the history is updated in place)
    def solve(self, problem: RootProblem, y0: Tensor) -> SolveResult:
        flat, beta = FlatProblem(problem, y0), self.damping
        y = flat.y0_flat
        g = flat.g(y)
        f = g - y
        log = IterationLog(self, flat, y, f)
        eps = torch.finfo(y.dtype).eps
        lam = max(self.regularization if self.regularization is not None else eps ** 0.5,
                  1e3 * eps)
        history = _History(flat.B, flat.n, self.m, lam, log.res, y.dtype)
        restarts = torch.zeros(flat.B, dtype=torch.int64, device=y.device)
        base = g if beta == 1.0 else torch.add(y, f, alpha=beta)  # y + β f
        for k in range(1, self.max_iter + 1):
            if log.finished:
                break
            active = log.active
            step, broken = base, None
            if not history.empty:
                gamma, broken = history.coefficients()
                step = history.mix(base, gamma)
                if broken is not None:
                    restarts += broken if active is None else broken & active.squeeze(-1)
            y_new = where_active(active, step, y)
            g = flat.g(y_new)
            f_new = history.residual(g, y_new)
            base_new = g if beta == 1.0 else torch.add(y_new, f_new, alpha=beta)
            history.push(f_new, f, base_new, base, reset=broken)
            y, f, base = y_new, f_new, base_new
            log.update(y, f, active, k)
            flat.observe(k, y)
        stats = log.stats(restarts=restarts.reshape(flat.batch_shape), memory=self.m)
        return SolveResult(flat.result(y), stats)

    def __repr__(self) -> str:
        return (f"Anderson(m={self.m}, regularization={self.regularization}, "
                f"damping={self.damping}, tol={self.tol}, rtol={self.rtol}, "
                f"max_iter={self.max_iter})")


class _History:
    """Circular buffers of the last ``m`` residual differences ``ΔF`` and mixing directions
    ``D = ΔY + β ΔF``, the Gram matrix ``ΔFᵀΔF`` and the right-hand side ``ΔFᵀ f`` of the
    newest residual, kept up to date column by column. Columns not yet filled, or dropped by
    a sample's restart, have zero Gram entries and right-hand side, so their coefficient is 0
    (the regularization keeps the diagonal positive). The per-column validity mask exists
    only once some sample has restarted."""

    def __init__(self, B: int, n: int, m: int, lam: float, res0: Tensor, dtype: torch.dtype):
        device = res0.device
        self.dF = torch.zeros(B, m, n, dtype=dtype, device=device)
        self.D = torch.zeros(B, m, n, dtype=dtype, device=device)
        # ΔF is stored divided by the initial residual norm of its sample, so that the Gram
        # matrix neither overflows nor underflows at any scale of f (γ does not change)
        tiny = torch.finfo(dtype).tiny
        self.unit64 = torch.where(res0 > 0, 1 / res0, 1.0).clamp(tiny, 1 / tiny)[:, None]
        self.unit = self.unit64.to(dtype)
        # the small quantities in float64: the normal equations are solved in float64
        self.gram = torch.zeros(B, m, m, dtype=torch.float64, device=device)
        self.rhs = torch.zeros(B, m, dtype=torch.float64, device=device)
        self.eye = torch.eye(m, dtype=torch.float64, device=device)
        self.valid: Tensor | None = None  # 1.0 / 0.0 per column, once a sample restarted
        self.count: Tensor | float = 1.0  # valid columns per sample
        # two alternating (B, 2, n) work buffers holding [scaled Δf, f] of the newest step:
        # one batched product with ΔF gives the new Gram row and the next right-hand side
        self.work = torch.empty(2, B, 2, n, dtype=dtype, device=device)
        self.m, self.lam, self.pushed = m, lam, 0

    @property
    def empty(self) -> bool:
        return self.pushed == 0

    def coefficients(self) -> tuple[Tensor, Tensor | None]:
        """Mixing coefficients ``γ`` (B, m) and the mask of samples whose system broke down
        (None when known on the host to be empty)."""
        if not _solve_on_host(self.gram):
            gamma, ok = _mixing_coefficients(self.gram, self.rhs, self.count, self.eye, self.lam)
            return gamma.to(self.D.dtype), ~ok
        count = self.count.detach().numpy() if isinstance(self.count, Tensor) else self.count
        gamma, ok = _mixing_coefficients(self.gram.detach().numpy(), self.rhs.detach().numpy(),
                                         count, self.eye.numpy(), self.lam)
        broken = None if ok.all() else torch.from_numpy(~ok)
        return torch.from_numpy(gamma).to(self.D.dtype), broken

    def mix(self, base: Tensor, gamma: Tensor) -> Tensor:
        """``base − Σ_i γ_i D_i`` per sample, shape (B, n)."""
        return torch.baddbmm(base.unsqueeze(1), gamma.unsqueeze(1), self.D, alpha=-1).squeeze(1)

    def residual(self, g: Tensor, y: Tensor) -> Tensor:
        """``f = g − y``, written where :meth:`push` reads it next."""
        return torch.sub(g, y, out=self.work[self.pushed % 2, :, 1])

    def push(self, f: Tensor, f_old: Tensor, base: Tensor, base_old: Tensor,
             reset: Tensor | None) -> None:
        """Store the newest differences ``Δf = f − f_old`` and ``Δy + β Δf = base − base_old``
        (``base = y + β f``), and update the Gram matrix and the right-hand side for the
        newest residual ``f`` (from :meth:`residual`); samples in ``reset`` drop their older
        columns."""
        work = self.work[self.pushed % 2]
        if f.data_ptr() != work[:, 1].data_ptr():  # f did not come from residual()
            work[:, 1] = f
        slot = self.pushed % self.m
        self.pushed += 1
        if reset is not None:
            if self.valid is None:
                self.valid = (torch.arange(self.m, device=self.gram.device) < self.pushed - 1) \
                    .to(torch.float64).expand(len(reset), -1)
            self.valid = self.valid * (~reset).unsqueeze(-1)
            self.gram = torch.where(reset.reshape(-1, 1, 1), 0.0, self.gram)  # inf·0 is NaN
        if self.valid is None:
            self.count = float(min(self.pushed, self.m))
        else:
            self.valid[:, slot] = 1.0
            self.count = self.valid.sum(-1, keepdim=True)
        self.dF[:, slot] = torch.sub(f, f_old, out=work[:, 0]).mul_(self.unit)
        torch.sub(base, base_old, out=self.D[:, slot])
        # ⟨ΔF_i, Δf⟩ (new row and column) and ⟨ΔF_i, f⟩ (next right-hand side) in one product;
        # columns never filled are zero, those a restart dropped are masked
        prods = torch.bmm(work, self.dF.mT)
        if self.valid is not None:
            prods = prods * self.valid.unsqueeze(1)
        self.gram[:, slot, :] = prods[:, 0]
        self.gram[:, :, slot] = prods[:, 0]
        self.rhs = prods[:, 1] * self.unit64


def _solve_on_host(t: Tensor) -> bool:
    """Whether the small systems of ``t``'s device go to NumPy (CPU tensors)."""
    return t.device.type == "cpu"


def _mixing_coefficients(gram, rhs, count, eye, lam: float):
    """``γ = (G + λ s I)⁻¹ r`` with ``s = trace(G) / count`` per sample, for NumPy arrays
    (CPU: LAPACK through NumPy's batched ``solve``) or torch tensors (CUDA: ``cholesky_ex``).
    Returns ``γ`` (0 where it is not finite) and the mask of samples where it is finite."""
    on_host = isinstance(gram, np.ndarray)
    xp = np if on_host else torch
    # NaN/Inf are expected here (an overflowing Gram matrix) and are handled at the end
    with np.errstate(all="ignore") if on_host else contextlib.nullcontext():
        scale = gram.diagonal(0, -2, -1).sum(-1)[:, None] / count
        system = gram + (scale * lam).clip(min=_TINY)[:, :, None] * eye
        gamma: np.ndarray | Tensor
        if on_host:
            gamma = _solve_each(system, rhs)
        else:
            L, info = torch.linalg.cholesky_ex(system)
            gamma = torch.cholesky_solve(rhs[..., None], L)[..., 0]
            gamma = torch.where((info == 0)[:, None], gamma, torch.nan)
        ok = abs(gamma.sum(-1)) < float("inf")  # False for NaN and Inf
        return xp.where(ok[:, None], gamma, 0.0), ok


def _solve_each(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NumPy's batched solve; if some system has an exactly zero pivot (LinAlgError for the
    whole batch), sample by sample, with NaN for the singular ones."""
    try:
        return np.linalg.solve(A, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        out = np.full_like(b, np.nan)
        for i in range(len(b)):
            try:
                out[i] = np.linalg.solve(A[i], b[i])
            except np.linalg.LinAlgError:
                pass
        return out


_TINY = torch.finfo(torch.float64).tiny
