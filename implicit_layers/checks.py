"""Validation of user input: every check raises ``ValueError`` naming the argument."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from implicit_layers.compat import is_wrapped

FAILURE_POLICIES = ("raise", "warn")
#: dtypes the solvers support: half precision lacks the range and the LAPACK kernels
DTYPES = (torch.float32, torch.float64)


def check_tensor(name: str, t, *, min_ndim: int = 0, finite: bool = True) -> Tensor:
    """Check that ``t`` is a floating-point tensor with at least ``min_ndim`` dims.

    With ``finite=True`` NaN/Inf entries are rejected. Value checks are skipped on tensors
    that cannot be inspected (e.g. inside ``torch.func.vmap``); they run again on the
    unwrapped data inside the layers' autograd functions.
    """
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise ValueError(f"{name} must have a floating dtype float32 or float64, got {t.dtype}")
    if t.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if finite and not is_wrapped(t) and not all_finite(t):
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


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite. One reduction on the common path: a finite
    sum proves every entry finite; only an infinite or NaN sum (which overflow can also
    cause) needs the elementwise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_positive(name: str, value, *, allow_none: bool = True, allow_zero: bool = False):
    """A finite positive number (or None where allowed); ``ValueError`` naming it otherwise."""
    if value is None and allow_none:
        return value
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def check_count(name: str, value, *, minimum: int = 1):
    """An integer ``>= minimum``; ``ValueError`` naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value
