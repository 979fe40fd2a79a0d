"""Training-stability tools for deep-equilibrium models.

* :func:`jacobian_frobenius_estimate` — Hutchinson's estimate of ``‖J_z‖²_F`` for the cell's
  Jacobian at the equilibrium, differentiable with respect to the cell's parameters, meant to
  be added to the loss (Jacobian regularization, Bai et al. 2021).
* :func:`spectral_radius` — the dominant ``|λ(J_z)|`` by power iteration; the fixed point is
  locally attracting (and the implicit backward well posed) when it is below 1.
* :func:`warn_off_equilibrium` — a warning when the implicit gradient is about to be taken
  at a point whose fixed-point residual is large, where the implicit gradient is inaccurate.

All three work per sample: ``z`` has shape ``(*batch, *event)`` with ``event_ndim`` trailing
event dims, and the cell must not mix samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from implicit_layers.compat import func_vjp
from implicit_layers.errors import ConvergenceWarning

Map = Callable[[Tensor], Tensor]


def _event_dims(event_ndim: int) -> tuple[int, ...]:
    return tuple(range(-event_ndim, 0))


def _per_sample_sq_norm(t: Tensor, event_ndim: int) -> Tensor:
    return (t * t).sum(dim=_event_dims(event_ndim)) if event_ndim else t * t


def jacobian_frobenius_estimate(fn: Map, z: Tensor, *, event_ndim: int = 1, samples: int = 1,
                                generator: torch.Generator | None = None) -> Tensor:
    """Unbiased Hutchinson estimate of ``‖∂fn/∂z‖²_F`` per sample.

    ``E_ε ‖εᵀ J‖² = tr(J Jᵀ) = ‖J‖²_F`` for ``ε ~ N(0, I)``; each sample costs one VJP. The
    point ``z`` is detached, so when grad mode is on the estimate is differentiable with
    respect to the parameters ``fn`` closes over (not ``z``): add ``weight * est.mean()`` to
    the loss to push the cell towards a well-conditioned contraction.

    Args:
        fn: the fixed-point map ``z ↦ cell(x, z)`` (``x`` closed over).
        z: the point, usually the equilibrium, shape ``(*batch, *event)``.
        event_ndim: number of trailing event dims of ``z``.
        samples: number of random probes averaged.
        generator: optional ``torch.Generator`` for the probes.

    Returns:
        The estimate per sample, shape ``(*batch,)``.

    >>> import torch
    >>> A = torch.tensor([[0.5, 0.2], [0.0, 0.3]])
    >>> est = jacobian_frobenius_estimate(lambda z: z @ A.T, torch.zeros(4000, 2))
    >>> abs(float(est.mean()) - float((A ** 2).sum())) < 0.03   # exact value 0.38
    True
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    point = z.detach()
    _, vjp_fn = func_vjp(fn, point)
    total = point.new_zeros(point.shape[: point.ndim - event_ndim])
    for _ in range(samples):
        eps = torch.randn(point.shape, generator=generator, dtype=point.dtype, device=point.device)
        (row,) = vjp_fn(eps)
        total = total + _per_sample_sq_norm(row, event_ndim)
    return total / samples


def spectral_radius(fn: Map, z: Tensor, *, event_ndim: int = 1, iters: int = 30,
                    generator: torch.Generator | None = None) -> Tensor:
    """Power-iteration estimate of the spectral radius of ``∂fn/∂z`` at ``z``, per sample.

    Iterates ``v ← Jᵀ v / ‖Jᵀ v‖`` (``Jᵀ`` has the spectrum of ``J``; VJPs reuse one
    linearization) and returns the mean log growth over the second half of the iterations,
    ``exp(mean log ‖Jᵀ v_k‖)``, which also settles when the dominant eigenvalues are a complex
    pair. Not differentiable (an inspection tool); ``|λ| < 1`` means ``z`` is attracting.

    Args:
        fn: the fixed-point map ``z ↦ cell(x, z)``.
        z: the point, shape ``(*batch, *event)``.
        event_ndim: number of trailing event dims of ``z``.
        iters: power iterations (VJPs).
        generator: optional generator for the starting vector.

    Returns:
        The estimate per sample, shape ``(*batch,)``.

    >>> import torch
    >>> A = torch.tensor([[0.9, 1.0], [0.0, 0.5]], dtype=torch.float64)
    >>> rho = spectral_radius(lambda z: z @ A.T, torch.zeros(1, 2, dtype=torch.float64), iters=60)
    >>> round(float(rho), 3)
    0.9
    """
    if iters < 2:
        raise ValueError(f"iters must be >= 2, got {iters}")
    point = z.detach()
    with torch.no_grad():
        _, vjp_fn = func_vjp(fn, point)
        v = torch.randn(point.shape, generator=generator, dtype=point.dtype, device=point.device)
        v = v / _per_sample_sq_norm(v, event_ndim).sqrt().reshape(*v.shape[: v.ndim - event_ndim],
                                                                  *([1] * event_ndim))
        tiny = torch.finfo(point.dtype).tiny
        log_growth, counted = torch.zeros_like(v.sum(dim=_event_dims(event_ndim))), 0
        for k in range(iters):
            (w,) = vjp_fn(v)
            norm = _per_sample_sq_norm(w, event_ndim).sqrt().clamp_min(tiny)
            if k >= iters // 2:
                log_growth, counted = log_growth + norm.log(), counted + 1
            v = w / norm.reshape(*norm.shape, *([1] * event_ndim))
        return (log_growth / counted).exp()


def warn_off_equilibrium(residual_norm: Tensor, z: Tensor, threshold: float,
                         event_ndim: int = 1, where: str = "DEQLayer", atol: float = 0.0) -> bool:
    """Warn (:class:`~implicit_layers.ConvergenceWarning`) when some sample's fixed-point
    residual exceeds ``atol + threshold · ‖z‖`` (the solvers' form of a tolerance, so that an
    equilibrium at ``z = 0`` met to ``atol`` does not warn): the implicit gradient assumes an
    exact equilibrium and is inaccurate there. Returns whether it warned.

    Args:
        residual_norm: ``‖cell(x, z) − z‖`` per sample (e.g. ``stats.forward.residual``).
        z: the point, shape ``(*batch, *event)``.
        threshold: the largest acceptable relative residual.
        atol: the absolute part (e.g. the forward solver's absolute tolerance).

    >>> import torch, warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_off_equilibrium(torch.full((2,), 0.1), torch.ones(2, 3), threshold=1e-3)
    True
    """
    num = residual_norm.detach().double()
    den = _per_sample_sq_norm(z.detach().double(), event_ndim).sqrt().reshape(num.shape)
    ok = num <= atol + threshold * den  # False for NaN
    if bool(ok.all()):
        return False
    rel = torch.where(num == 0, torch.zeros_like(num), num / den)
    worst = float(torch.where(ok, 0.0, rel).nan_to_num(nan=float("inf")).max())
    warnings.warn(
        f"{where}: the implicit gradient is taken at a point that is not an equilibrium "
        f"(relative residual {worst:.2e} > {threshold:.0e} in {int((~ok).sum())} of "
        f"{ok.numel()} samples); the gradient is inaccurate: tighten the forward solve or raise "
        f"max_iter", ConvergenceWarning, stacklevel=3)
    return True
