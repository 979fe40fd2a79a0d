"""Gradients of inputs that were broadcast over batch dims: summed back to their own shape."""

from __future__ import annotations

from torch import Tensor


def sum_to(t: Tensor, shape) -> Tensor:
    """``t`` summed over the dims that ``shape`` broadcast along (a no-op when equal)."""
    return t if t.shape == shape else t.sum_to_size(shape)


def outer_sum(U: Tensor, V: Tensor, shape) -> Tensor:
    """``Σ_k U[..., k] V[..., k]ᵀ`` for stacked vectors ``U (*, r, k)``, ``V (*, c, k)``,
    summed to ``shape`` (the batch dims an input was broadcast along).

    >>> import torch
    >>> U, V = torch.ones(3, 2, 1), torch.ones(3, 4, 1)
    >>> outer_sum(U, V, (2, 4))          # one matrix shared by a batch of 3: one GEMM
    tensor([[3., 3., 3., 3.],
            [3., 3., 3., 3.]])
    """
    if len(shape) == 2 and U.ndim > 2:  # one matrix shared by the batch: a single GEMM
        return U.movedim(-2, 0).flatten(1) @ V.movedim(-2, 0).flatten(1).mT
    return sum_to(U @ V.mT, shape)
