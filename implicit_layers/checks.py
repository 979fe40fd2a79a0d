"""Validation of user input: every check raises ``ValueError`` naming the argument."""

from __future__ import annotations

import torch
from torch import Tensor

FAILURE_POLICIES = ("raise", "warn")


def check_tensor(name: str, t, *, min_ndim: int = 0, finite: bool = True) -> Tensor:
    """Check that ``t`` is a floating-point tensor with at least ``min_ndim`` dims.

    With ``finite=True`` NaN/Inf entries are rejected. Value checks are skipped on tensors
    that cannot be inspected (e.g. inside ``torch.func.vmap``); they run again on the
    unwrapped data inside the layers' autograd functions.
    """
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype (float32/float64), got {t.dtype}")
    if t.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if finite and not _is_functorch_wrapped(t) and not _all_finite(t):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def check_same_dtype_device(named: dict[str, Tensor]) -> None:
    """Require one dtype and one device across the named tensors."""
    items = list(named.items())
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_policy(on_failure: str) -> str:
    if on_failure not in FAILURE_POLICIES:
        raise ValueError(f"on_failure must be one of {FAILURE_POLICIES}, got {on_failure!r}")
    return on_failure


def _is_functorch_wrapped(t: Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _all_finite(t: Tensor) -> bool:
    """One reduction on the common path: a finite sum proves every entry finite; only an
    infinite or NaN sum (which overflow can also cause) needs the elementwise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
