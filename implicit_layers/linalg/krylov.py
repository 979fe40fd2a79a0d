"""Matrix-free Krylov solvers, batched with per-sample stopping.

Each solver needs only products with the operator (``matvec``/``rmatvec``), so a Jacobian is
never materialized. Vectors have shape ``(*batch, n)``; every sample stops on its own
criterion ``‖b − A x‖ ≤ max(atol, rtol · ‖b‖)`` (converged samples are frozen while the others
iterate), and the stats report iterations and final residuals per sample.

* :class:`CG` — symmetric positive definite operators only.
* :class:`GMRES` — any nonsingular operator (restarted, least-squares on the Hessenberg matrix).
* :class:`BiCGStab` — any nonsingular operator, short recurrences (less memory than GMRES).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from implicit_layers.checks import all_finite, check_count, check_positive
from implicit_layers.compat import is_wrapped
from implicit_layers.errors import ConvergenceError
from implicit_layers.linalg.base import Factorization, LinearOperator, LinearSolver
from implicit_layers.stats import SolverStats

MatVec = Callable[[Tensor], Tensor]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num/den with 0 where den vanishes (a breakdown freezes the sample instead of NaN)."""
    ok = den.abs() > torch.finfo(den.dtype).tiny
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


class KrylovSolver(LinearSolver):
    """Shared options: ``rtol``, ``atol`` and ``max_iter`` (total operator products)."""

    needs_dense = False
    name = "krylov"

    def __init__(self, rtol: float | None = None, atol: float = 0.0, max_iter: int = 200):
        self.rtol = check_positive("rtol", rtol, allow_zero=True)
        self.atol = check_positive("atol", atol, allow_none=False, allow_zero=True)
        self.max_iter = check_count("max_iter", max_iter)

    def factor(self, op: LinearOperator) -> KrylovFactorization:
        return KrylovFactorization(self, op)

    def tolerance(self, b: Tensor) -> Tensor:
        rtol = self.rtol if self.rtol is not None else torch.finfo(b.dtype).eps ** 0.75
        return torch.clamp(rtol * b.norm(dim=-1), min=self.atol)

    def run(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> tuple[Tensor, SolverStats]:
        """Solve ``A x = b`` for ``b`` of shape ``(B, n)``."""
        raise NotImplementedError

    def _stats(self, it: Tensor, res: Tensor, tol: Tensor, evals: int) -> SolverStats:
        return SolverStats(self.name, it, res, res <= tol, evaluations=evals)


class KrylovFactorization(Factorization):
    """A Krylov solver bound to an operator: each solve iterates afresh."""

    def __init__(self, solver: KrylovSolver, op: LinearOperator):
        self.solver, self.op = solver, op

    def solve(self, b: Tensor, transpose: bool = False) -> Tensor:
        shape = b.shape
        flat = b.reshape(-1, shape[-1])

        def mv(v: Tensor) -> Tensor:
            out = self.op.matvec(v.reshape(shape), transpose).reshape(flat.shape)
            if not is_wrapped(out) and not all_finite(out):  # stop before LAPACK sees NaN
                raise ConvergenceError(
                    f"{self.solver.name}: the operator returned NaN/Inf (its matrix has NaN/Inf "
                    f"entries: the function is not differentiable there, or overflows)")
            return out

        x, self.stats = self.solver.run(mv, flat)
        self.stats.iterations = self.stats.iterations.reshape(shape[:-1])
        self.stats.residual = self.stats.residual.reshape(shape[:-1])
        self.stats.converged = self.stats.converged.reshape(shape[:-1])
        return x.reshape(shape)


class CG(KrylovSolver):
    """Conjugate gradients; the operator must be symmetric positive definite.

    >>> import torch
    >>> from implicit_layers.linalg.base import LinearOperator
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> x = CG(rtol=1e-12).factor(LinearOperator.from_dense(A)).solve(A @ torch.ones(2, dtype=torch.float64))
    >>> torch.allclose(x, torch.ones(2, dtype=torch.float64))
    True"""

    name = "CG"

    def run(self, matvec, b, x0=None):
        tol = self.tolerance(b)
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        r = b - matvec(x) if x0 is not None else b.clone()
        p, rr = r.clone(), _dot(r, r)
        it = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
        evals = 0
        for _ in range(self.max_iter):
            active = rr.sqrt() > tol
            if not bool(active.any()):
                break
            Ap = matvec(p)
            evals += 1
            alpha = _safe_div(rr, _dot(p, Ap)) * active
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * Ap
            rr_new = _dot(r, r)
            p = r + _safe_div(rr_new, rr)[:, None] * p
            rr, it = rr_new, it + active
        res = (b - matvec(x)).norm(dim=-1)
        return x, self._stats(it, res, tol, evals + 1)


class BiCGStab(KrylovSolver):
    """Biconjugate gradients stabilized (van der Vorst) for general operators.

    >>> import torch
    >>> from implicit_layers.linalg.base import LinearOperator
    >>> A = torch.tensor([[4.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
    >>> fac = BiCGStab(rtol=1e-12).factor(LinearOperator.from_dense(A))
    >>> torch.allclose(fac.solve(A.T @ torch.ones(2, dtype=torch.float64), transpose=True),
    ...                torch.ones(2, dtype=torch.float64))
    True"""

    name = "BiCGStab"

    def run(self, matvec, b, x0=None):
        tol = self.tolerance(b)
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        r = b - matvec(x) if x0 is not None else b.clone()
        r_hat = r.clone()
        rho = alpha = omega = torch.ones(b.shape[0], dtype=b.dtype, device=b.device)
        v = p = torch.zeros_like(b)
        it = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
        evals = 0
        for _ in range(self.max_iter):
            active = r.norm(dim=-1) > tol
            if not bool(active.any()):
                break
            rho_new = _dot(r_hat, r)
            beta = _safe_div(rho_new, rho) * _safe_div(alpha, omega)
            p = r + beta[:, None] * (p - omega[:, None] * v)
            v = matvec(p)
            alpha = _safe_div(rho_new, _dot(r_hat, v))
            s = r - alpha[:, None] * v
            t = matvec(s)
            evals += 2
            omega = _safe_div(_dot(t, s), _dot(t, t))
            step = alpha[:, None] * p + omega[:, None] * s
            x = x + active[:, None] * step
            r = torch.where(active[:, None], s - omega[:, None] * t, r)
            rho, it = rho_new, it + active
        res = (b - matvec(x)).norm(dim=-1)
        return x, self._stats(it, res, tol, evals + 1)


class GMRES(KrylovSolver):
    """Restarted GMRES(``restart``) for general nonsingular operators.

    >>> import torch
    >>> from implicit_layers.linalg.base import LinearOperator
    >>> A = torch.tensor([[4.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
    >>> fac = GMRES(rtol=1e-12).factor(LinearOperator.from_dense(A))
    >>> x = fac.solve(A @ torch.ones(2, dtype=torch.float64))
    >>> torch.allclose(x, torch.ones(2, dtype=torch.float64)), fac.stats.iterations.tolist()
    (True, 2)"""

    name = "GMRES"

    def __init__(self, rtol=None, atol=0.0, max_iter=200, restart: int = 30):
        super().__init__(rtol, atol, max_iter)
        self.restart = check_count("restart", restart)

    def run(self, matvec, b, x0=None):
        tol = self.tolerance(b)
        B = b.shape[0]
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        it = torch.zeros(B, dtype=torch.int64, device=b.device)
        evals, total = 0, 0
        while total < self.max_iter:
            r = b - matvec(x) if (total or x0 is not None) else b.clone()
            evals += bool(total or x0 is not None)
            beta = r.norm(dim=-1)
            active = beta > tol
            if not bool(active.any()):
                break
            m = min(self.restart, self.max_iter - total)
            V = [r / beta.clamp_min(torch.finfo(b.dtype).tiny)[:, None]]
            H = torch.zeros(B, m + 1, m, dtype=b.dtype, device=b.device)
            e1 = torch.zeros(B, m + 1, dtype=b.dtype, device=b.device)
            e1[:, 0] = beta
            for j in range(m):
                w = matvec(V[j])
                evals += 1
                for i in range(j + 1):  # modified Gram-Schmidt
                    H[:, i, j] = _dot(V[i], w)
                    w = w - H[:, i, j, None] * V[i]
                H[:, j + 1, j] = w.norm(dim=-1)
                V.append(w * _safe_div(torch.ones_like(beta), H[:, j + 1, j])[:, None])
                y = torch.linalg.lstsq(H[:, : j + 2, : j + 1], e1[:, : j + 2, None]).solution
                res = (e1[:, : j + 2] - (H[:, : j + 2, : j + 1] @ y).squeeze(-1)).norm(dim=-1)
                it = it + active
                total += 1
                active = active & (res > tol)
                if not bool(active.any()) or total >= self.max_iter:
                    break
            Vm = torch.stack(V[: y.shape[1]], dim=-1)  # (B, n, j+1)
            x = x + (Vm @ y).squeeze(-1)
        res = (b - matvec(x)).norm(dim=-1)
        return x, self._stats(it, res, tol, evals + 1)
