"""Do the samples of a batch interact? A probe instead of an assumption.

A layer treats the leading dims of ``y`` as a batch of independent samples: its Jacobian
``∂f/∂y`` is then block diagonal, and the per-sample blocks are what the adjoints factor. A
residual that mixes samples (``A @ tanh(y)`` over rows, batch statistics, ``X @ Y − I`` with
``event_ndim=1``) has off-diagonal blocks, and a block-diagonal backward would return a wrong
gradient without a word. So the layer probes the Jacobian before it trusts the structure.

Probe: for each bit ``k`` of the sample index, a random cotangent ``u_k`` supported on the
samples whose index has bit ``k`` set. For independent samples ``Jᵀu_k`` vanishes *exactly*
(structural zeros, not rounding) on the other samples; any two distinct samples differ in some
bit, so ``⌈log₂ B⌉`` VJPs detect every coupled pair. Exact zeros make the test free of
tolerances up to round-off of the coupling itself. The VJPs are taken with plain autograd, not
``torch.func``: a residual that updates state in place (BatchNorm's running statistics in
training mode) is then diagnosed as coupled instead of failing inside a transform.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def coupled_samples(residual: Callable[[Tensor], Tensor], y: Tensor, event_ndim: int) -> bool:
    """Whether some sample of ``y`` (shape ``(*batch, *event)``) influences another's residual.

    >>> import torch
    >>> y = torch.ones(4, 3, dtype=torch.float64)
    >>> coupled_samples(lambda y: y ** 2, y, 1), coupled_samples(lambda y: y - y.mean(0), y, 1)
    (False, True)
    """
    batch = y.shape[: y.ndim - event_ndim]
    B = batch.numel()
    if B < 2:
        return False
    index = torch.arange(B, device=y.device)
    bits = math.ceil(math.log2(B))
    sets = torch.stack([(index >> k) & 1 for k in range(bits)]).bool()  # (bits, B)
    mask = sets.reshape(bits, *batch, *([1] * event_ndim))
    gen = torch.Generator(device=y.device).manual_seed(0)
    probes = torch.randn((bits, *y.shape), generator=gen, dtype=y.dtype, device=y.device) * mask
    with torch.enable_grad():
        point = y.detach().requires_grad_()
        f = residual(point)
        if not f.requires_grad:  # f does not depend on y at all
            return False
        rows = torch.stack([
            _zero_if_none(torch.autograd.grad(f, point, u, retain_graph=True, allow_unused=True)[0],
                          point)
            for u in probes])
    event = tuple(range(-event_ndim, 0)) if event_ndim else ()
    per_sample = rows.abs().sum(event) if event_ndim else rows.abs()  # (bits, *batch)
    per_sample = per_sample.reshape(bits, B)
    outside = torch.where(sets, torch.zeros_like(per_sample), per_sample).amax(-1)
    inside = torch.where(sets, per_sample, torch.zeros_like(per_sample)).amax(-1)
    # independent samples give exact zeros outside; allow the round-off of a reduction
    scale = torch.finfo(y.dtype).eps * y[0].numel() * inside.clamp_min(torch.finfo(y.dtype).tiny)
    return bool((outside > scale).any())


def _zero_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def interacting_samples_error(name: str, batch_shape, event_ndim: int, ndim: int) -> ValueError:
    return ValueError(
        f"{name}: the residual mixes samples along the batch dims {tuple(batch_shape)} "
        f"(event_ndim={event_ndim} declares them independent), so a per-sample backward "
        f"would return a wrong gradient. Declare the whole tensor as one unknown with "
        f"event_ndim={ndim} (use a KrylovAdjoint for large unknowns), or make the residual "
        f"act on each sample separately (e.g. BatchNorm in eval mode)")


class SampleCheck:
    """Probes a layer's residual once per training mode (batch statistics differ between
    ``train()`` and ``eval()``) and raises :func:`interacting_samples_error` if it couples
    samples. Call it with the mode bound: ``check.bind(training)``."""

    def __init__(self, name: str, event_ndim: int):
        self.name, self.event_ndim = name, event_ndim
        self.passed: set[bool] = set()

    def bind(self, mode: bool):
        if mode in self.passed:
            return None

        def check(residual: Callable[[Tensor], Tensor], y: Tensor) -> None:
            if coupled_samples(residual, y, self.event_ndim):
                raise interacting_samples_error(self.name, y.shape[: y.ndim - self.event_ndim],
                                                self.event_ndim, y.ndim)
            self.passed.add(mode)

        return check
