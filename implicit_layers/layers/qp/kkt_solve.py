"""A differentiable solve with a QP's KKT matrix that reuses a factorization.

``z = M⁻¹ r`` with the symmetric matrix (see :mod:`implicit_layers.linalg.kkt.inequality`)

    M(Q, A, G, w) = [[Q, Aᵀ, Gᵀ], [A, 0, 0], [G, 0, −diag(w)]]

where ``fac`` is any object whose ``solve(r1, r2, r3)`` applies ``M⁻¹`` (up to a small
regularization, removed by iterative refinement against the exact ``M``). The QP layer's
backward and JVP are solves with ``M``; writing them with this Function makes them
differentiable again (double backward, ``jacfwd(jacrev)``) without ever refactoring.

Derivation (ż tangents, z̄ adjoints). From ``M z = r``:

    pushforward:  ż = M⁻¹ (ṙ − Ṁ z),   Ṁ z = [Q̇z₁ + Ȧᵀz₂ + Ġᵀz₃;  Ȧz₁;  Ġz₁ − ẇ∘z₃]
    pullback:     with ŵ = M⁻ᵀ z̄ = M⁻¹ z̄ (M is symmetric)
                  ⟨z̄, ż⟩ = ⟨ŵ, ṙ⟩ − ⟨ŵ, Ṁ z⟩, so
                  r̄ = ŵ,   Q̄ = −ŵ₁z₁ᵀ,   Ā = −(z₂ŵ₁ᵀ + ŵ₂z₁ᵀ),
                  Ḡ = −(z₃ŵ₁ᵀ + ŵ₃z₁ᵀ),   w̄ = ŵ₃∘z₃.

The adjoint solve ``ŵ = M⁻¹ z̄`` calls this Function again, so every order of
differentiation reuses the same factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.linalg.kkt.inequality import kkt_matvec, refine


def _outer(u: Tensor, v: Tensor) -> Tensor:
    return u.unsqueeze(-1) * v.unsqueeze(-2)


class KKTSolve(torch.autograd.Function):
    """``(z₁, z₂, z₃) = M(Q, A, G, w)⁻¹ (r₁, r₂, r₃)`` given a factorization ``fac`` of ``M``.

    All tensors share one flat batch dim ``(B, ...)``; ``steps`` rounds of refinement.
    """

    @staticmethod
    def forward(fac, Q, A, G, w, r1, r2, r3, steps):
        return refine(fac, Q, A, G, w, (r1, r2, r3), steps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        fac, Q, A, G, w, _, _, _, steps = inputs
        ctx.fac, ctx.steps = fac, steps
        ctx.save_for_backward(Q, A, G, w, *output)
        ctx.save_for_forward(Q, A, G, w, *output)

    @staticmethod
    def backward(ctx, g1, g2, g3):
        Q, A, G, w, z1, z2, z3 = ctx.saved_tensors
        v1, v2, v3 = KKTSolve.apply(ctx.fac, Q, A, G, w, g1, g2, g3, ctx.steps)
        Q_bar = -_outer(v1, z1)
        A_bar = -(_outer(z2, v1) + _outer(v2, z1))
        G_bar = -(_outer(z3, v1) + _outer(v3, z1))
        w_bar = v3 * z3
        return None, Q_bar, A_bar, G_bar, w_bar, v1, v2, v3, None

    @staticmethod
    def jvp(ctx, _fac, dQ, dA, dG, dw, dr1, dr2, dr3, _steps):
        Q, A, G, w, z1, z2, z3 = ctx.saved_tensors
        zeros = (torch.zeros_like(t) for t in (Q, A, G, w))
        dQ, dA, dG, dw = (d if d is not None else z for d, z in zip((dQ, dA, dG, dw), zeros, strict=True))
        Mz = kkt_matvec(dQ, dA, dG, dw, z1, z2, z3)
        rhs = tuple((dr if dr is not None else torch.zeros_like(m)) - m
                    for dr, m in zip((dr1, dr2, dr3), Mz, strict=True))
        return refine(ctx.fac, Q, A, G, w, rhs, ctx.steps)

    @staticmethod
    def vmap(info, in_dims, fac, Q, A, G, w, r1, r2, r3, steps):
        # fold the vmapped dim into the flat batch: (V, B, ...) → (V·B, ...), factors repeated
        V = info.batch_size
        args = []
        for t, d in zip((Q, A, G, w, r1, r2, r3), in_dims[1:8], strict=True):
            t = t.expand(V, *t.shape) if d is None else t.movedim(d, 0)
            args.append(t.reshape(-1, *t.shape[2:]))
        z = KKTSolve.apply(fac.repeat(V), *args, steps)
        return tuple(zi.reshape(V, -1, *zi.shape[1:]) for zi in z), (0, 0, 0)
