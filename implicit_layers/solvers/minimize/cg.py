"""Batched (preconditioned) conjugate gradients that watch the curvature.

``H x = b`` for symmetric ``H`` given by products, one system per row of ``b`` (B, n), each
row stopping on its own when ``‖b − H x‖ ≤ tol``. CG builds directions ``p`` with
``pᵀHp > 0`` as long as ``H`` is positive definite on the Krylov space; a direction with
``pᵀHp ≤ 0`` proves ``H`` is not positive definite, and the row stops there with
``negative_curvature`` set and ``x`` the last iterate before that direction. A truncated
Newton method takes that ``x`` (or ``−∇f`` when it is still zero); the implicit gradient of
an argmin refuses it: the point is not a minimizer (Nocedal & Wright, Algorithms 5.3, 7.1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Product = Callable[[Tensor], Tensor]


@dataclass
class CGResult:
    """``x`` (B, n); per row: ``iterations``, final ``residual`` norm (recomputed as
    ``‖b − H x‖`` when asked, else the recursive one), ``converged`` (residual within
    tolerance) and ``negative_curvature``; ``products``: batched products with ``H``."""

    x: Tensor
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    negative_curvature: Tensor
    products: int


def conjugate_gradient(hvp: Product, b: Tensor, tol: Tensor, max_iter: int,
                       preconditioner: Product | None = None,
                       true_residual: bool = False, refinements: int = 2) -> CGResult:
    """Solve ``H x = b`` from ``x = 0``; ``preconditioner(r)`` applies ``M⁻¹`` (symmetric
    positive definite) to residuals. With ``true_residual``, the residual is recomputed at the
    end and rows whose recursively updated residual drifted above ``tol`` restart from their
    iterate (up to ``refinements`` times).

    >>> import torch
    >>> H = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([[1.0, 2.0], [1.0, 0.0]], dtype=torch.float64)
    >>> res = conjugate_gradient(lambda v: v @ H, b, torch.full((2,), 1e-12), 10)
    >>> torch.allclose(res.x @ H, b), res.iterations.tolist()
    (True, [2, 2])
    >>> conjugate_gradient(lambda v: -v, b, torch.full((2,), 1e-12), 10).negative_curvature
    tensor([True, True])
    """
    apply_m = preconditioner if preconditioner is not None else (lambda r: r)
    out = _iterate(hvp, apply_m, torch.zeros_like(b), b.clone(), tol, max_iter)
    if not true_residual:
        return out
    for attempt in range(refinements + 1):
        r = b - hvp(out.x)
        out.products += 1
        out.residual = r.norm(dim=-1)
        out.converged = (out.residual <= tol) & ~out.negative_curvature
        retry = ~out.converged & ~out.negative_curvature & (out.iterations < max_iter)
        if attempt == refinements or not bool(retry.any()):
            return out
        again = _iterate(hvp, apply_m, out.x, torch.where(retry[:, None], r, 0), tol,
                         max_iter - int(out.iterations.min()))
        out.x = torch.where(retry[:, None], again.x, out.x)
        out.iterations = out.iterations + torch.where(retry, again.iterations, 0)
        out.negative_curvature = out.negative_curvature | (retry & again.negative_curvature)
        out.products += again.products
    return out


def _iterate(hvp: Product, apply_m: Product, x: Tensor, r: Tensor, tol: Tensor,
             max_iter: int) -> CGResult:
    """CG from ``x`` with residual ``r = b − H x`` (rows with ``r = 0`` do nothing)."""
    z = apply_m(r)
    p, rz = z, (r * z).sum(-1)
    res = r.norm(dim=-1)
    done = res <= tol
    negative = torch.zeros_like(done)
    iterations = torch.zeros(r.shape[:-1], dtype=torch.int64, device=r.device)
    products = 0
    for _ in range(max_iter):
        active = ~done
        if not bool(active.any()):
            break
        Hp = hvp(p)
        products += 1
        curvature = (p * Hp).sum(-1)
        bent = active & ~(curvature > 0)  # also catches NaN
        negative, done = negative | bent, done | bent
        active = active & ~bent
        alpha = torch.where(active, rz / torch.where(active, curvature, torch.ones_like(curvature)), 0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * Hp
        res = torch.where(active, r.norm(dim=-1), res)
        iterations = iterations + active
        done = done | (active & (res <= tol))
        z = apply_m(r)
        rz_new = (r * z).sum(-1)
        beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), 0)
        p = torch.where(active[:, None], z + beta[:, None] * p, p)
        rz = torch.where(active, rz_new, rz)
    return CGResult(x, iterations, res, (res <= tol) & ~negative, negative, products)
