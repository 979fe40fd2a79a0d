"""Approximate backward modes for deep-equilibrium models: phantom gradients and
Jacobian-free backpropagation.

**These are approximations, not the implicit gradient.** For a DEQ residual
``f(x, z) = cell(x, z) − z`` with ``J = ∂cell/∂z`` at the equilibrium, the exact adjoint solves
``(J − I)ᵀ w = ȳ``, i.e. ``w = −(I − Jᵀ)⁻¹ ȳ = −Σ_j (Jᵀ)^j ȳ``. The phantom gradient
(Geng et al., 2021) truncates this series after ``k`` damped terms, by ``k`` steps of the damped
Richardson iteration from ``w₀ = 0``:

    w_{i+1} = w_i + τ ((J − I)ᵀ w_i − ȳ)          ⇒   w_k = −τ Σ_{j<k} A^j ȳ,  A = (1 − τ) I + τ Jᵀ

and the layer returns ``x̄ = −(∂f/∂x)ᵀ w_k = τ Σ_{j<k} (∂cell/∂x)ᵀ A^j ȳ``. That is exactly
backpropagation through ``k`` damped steps ``z ← (1 − τ) z + τ cell(x, z)`` started at the
equilibrium (all Jacobians taken at ``z*``, which the unrolled steps do not move from when the
forward solve is exact). ``k = 1, τ = 1`` is Jacobian-free backprop (Fung et al., 2022):
``x̄ = (∂cell/∂x)ᵀ ȳ``, one VJP and no solve at all. Forward mode truncates the tangent series
``ż = −(J − I)⁻¹ (∂f/∂x) ẋ`` the same way.

Cost: ``k − 1`` VJPs (or JVPs) of the cell in the solve, independent of the forward
iterations. The direction is a descent direction for a contractive cell, which is why these
approximations train well, but gradcheck against the exact gradient fails by design.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.core.adjoint import Adjoint
from implicit_layers.stats import SolverStats


class PhantomAdjoint(Adjoint):
    """``k`` damped terms of the Neumann series of the DEQ adjoint (an approximation).

    Args:
        k: number of unrolled steps (``k ≥ 1``); larger ``k`` approaches the implicit
            gradient when the cell is a contraction.
        damping: τ in ``(0, 1]``.

    The recorded stats mark the solve as converged (it does what it promises) with
    ``extra["approximation"] = True``; ``residual`` is ``‖(J − I)ᵀ w − ȳ‖`` at the last iterate
    whose product was formed (``w_{k−1}``, which is ``‖ȳ‖`` for ``k = 1``).

    >>> import torch, implicit_layers as il
    >>> cell = torch.nn.Linear(3, 3, dtype=torch.float64)
    >>> layer = il.DEQLayer(lambda x, z: torch.tanh(0.5 * cell(z)) + x,
    ...                     adjoint=il.PhantomAdjoint(k=3, damping=0.8))
    >>> x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    >>> layer(x).sum().backward()
    >>> x.grad.shape, layer.stats.backward.extra["approximation"]
    (torch.Size([2, 3]), True)
    """

    def __init__(self, k: int = 5, damping: float = 1.0):
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"damping must lie in (0, 1], got {damping}")
        self.k, self.damping = int(k), damping

    def solve(self, lin, rhs: Tensor, transpose: bool) -> tuple[Tensor, SolverStats]:
        op, b, tau = lin.operator(), lin.flatten(rhs), self.damping
        w = -tau * b  # the first step from w₀ = 0 needs no product
        res = torch.linalg.vector_norm(b, dim=-1)
        for _ in range(self.k - 1):
            step = op.matvec(w, transpose) - b  # (J − I)ᵀ w − ȳ, or (J − I) w − ḃ
            res = torch.linalg.vector_norm(step, dim=-1)
            w = w + tau * step
        return w.reshape(rhs.shape), self._stats(res)

    def _stats(self, res: Tensor) -> SolverStats:
        res = res.detach()
        return SolverStats(
            solver=f"{type(self).__name__}(k={self.k}, damping={self.damping})",
            iterations=torch.full(res.shape, self.k, dtype=torch.int64, device=res.device),
            residual=res,
            converged=torch.ones(res.shape, dtype=torch.bool, device=res.device),
            evaluations=self.k - 1,
            extra={"approximation": True},
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k}, damping={self.damping})"


class JacobianFreeAdjoint(PhantomAdjoint):
    """Jacobian-free backpropagation: ``x̄ = (∂cell/∂x)ᵀ ȳ`` (phantom gradient with ``k = 1``,
    ``τ = 1``; an approximation that drops the ``(I − Jᵀ)⁻¹`` preconditioner).

    >>> import torch, implicit_layers as il
    >>> x = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
    >>> z0 = torch.zeros(1, 2, dtype=torch.float64)
    >>> z = il.functional.fixed_point(lambda x, z: 0.5 * z + x, x, z0,
    ...                               adjoint=il.JacobianFreeAdjoint())
    >>> z.sum().backward(); x.grad          # exact: 1 / (1 − 0.5) = 2; Jacobian-free: 1
    tensor([[1., 1.]], dtype=torch.float64)
    """

    def __init__(self):
        super().__init__(k=1, damping=1.0)

    def __repr__(self) -> str:
        return "JacobianFreeAdjoint()"
