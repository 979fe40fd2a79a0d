"""Jacobian-vector products that also work inside ``torch.autograd.forward_ad``.

``torch.func.jvp`` opens a forward-AD level of its own, which torch refuses while a classic
``forward_ad.dual_level()`` is active ("Nested forward mode AD is not supported"). There the
product is taken as a VJP of a VJP instead: ``J v = ∇_u ⟨Jᵀ u, v⟩``, linear in ``u``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from implicit_layers.compat import func_jvp, func_vjp, in_forward_ad


def jvp(f: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]):
    """``(f(*primals), J_f(primals) · tangents)``, like ``torch.func.jvp`` for one output."""
    if not in_forward_ad():
        return func_jvp(f, tuple(primals), tuple(tangents))
    out, vjp_fn = func_vjp(f, *primals)
    _, vjp_of_vjp = func_vjp(vjp_fn, torch.zeros_like(out))
    return out, vjp_of_vjp(tuple(tangents))[0]
