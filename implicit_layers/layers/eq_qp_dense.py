"""Dense batched equality-QP backend: autograd Functions that factor the KKT matrix once.

``_FactorKKT(Q, A)`` factors ``K = [[Q, Aᵀ], [A, 0]]`` (no gradient: derivatives with
respect to Q and A are carried by the solve). ``_FactoredKKTSolve(Q, A, p, q, *factors)``
solves ``K (x; λ) = (p; q)`` with those factors, and its backward and JVP call the same
factors again: the forward factorization is the only one, however many times (and to
whatever order) the result is differentiated. The QP is ``p = −c, q = b``.

Q is read as its symmetric part ``sym(Q) = (Q + Qᵀ)/2``: the factorization is of sym(Q),
products use ``sym(Q) v = (Qv + Qᵀv)/2`` (no symmetrized copy), and the gradient of Q is
symmetric. Torch ops only: runs on CPU and CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from implicit_layers.layers.eq_qp_kkt import KKTFactors, factor_kkt, kkt_matvec, tangent_rhs

#: event ndims of (Q, A, p, q)
_EVENT = (2, 2, 1, 1)


def sym(Q: Tensor) -> Tensor:
    """``(Q + Qᵀ)/2`` (not differentiable: used only to factor)."""
    return torch.add(Q, Q.mT).mul_(0.5)


def solve_refined(fac: KKTFactors, Q: Tensor, A: Tensor, p: Tensor, q: Tensor, refine: int):
    """Solve ``K z = (p; q)`` with ``refine`` steps of iterative refinement
    ``z ← z + K⁻¹((p; q) − K z)`` (Q read as sym(Q))."""
    x, lam = fac.solve(p, q)
    for _ in range(refine):
        Kx, Kl = kkt_matvec(Q, A, x, lam)
        dx, dl = fac.solve(p - Kx, q - Kl)
        x, lam = x + dx, lam + dl
    return x, lam


def align_for_vmap(batch_size: int, in_dims, tensors, event_ndims):
    """Turn a vmap call into one batched call: the vmapped dim goes first, unvmapped inputs
    get a broadcastable leading 1, and every input's own batch dims are padded on the left
    to the same count so that they broadcast as they would logically."""
    logical = [t.ndim - e - (d is not None)
               for t, d, e in zip(tensors, in_dims, event_ndims, strict=True)]
    width = max(logical)
    out = []
    for t, d, nb in zip(tensors, in_dims, logical, strict=True):
        t = t.movedim(d, 0) if d is not None else t.unsqueeze(0)
        out.append(t.reshape(t.shape[0], *([1] * (width - nb)), *t.shape[1:]))
    return out


def _outer_sum(U: Tensor, V: Tensor, shape) -> Tensor:
    """``Σ_k U[..., k] V[..., k]ᵀ`` for stacked vectors ``U (*, r, k)``, ``V (*, c, k)``,
    summed over the batch dims that ``shape`` does not have (broadcast inputs)."""
    if len(shape) == 2 and U.ndim > 2:  # one matrix shared by the batch: a single GEMM
        return U.movedim(-2, 0).flatten(1) @ V.movedim(-2, 0).flatten(1).mT
    return (U @ V.mT).sum_to_size(shape)


class _FactorKKT(Function):
    """``(Q, A) -> factor tensors``; runs on unwrapped tensors, so value checks work under
    torch.func transforms. Its outputs carry no gradient."""

    @staticmethod
    def forward(Q, A, method, rcond):
        return factor_kkt(sym(Q), A, method, rcond).tensors

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output)
        ctx.n_out = len(output)

    @staticmethod
    def backward(ctx, *grads):
        return None, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        return (None,) * ctx.n_out  # the outputs are non-differentiable

    @staticmethod
    def vmap(info, in_dims, Q, A, method, rcond):
        Q, A = align_for_vmap(info.batch_size, in_dims[:2], (Q, A), (2, 2))
        out = _FactorKKT.apply(Q, A, method, rcond)
        return out, (0,) * len(out)


class _FactoredKKTSolve(Function):
    """``(refine, Q, A, p, q, *factors) -> (x, λ)`` solving ``K (x; λ) = (p; q)``."""

    @staticmethod
    def forward(refine, Q, A, p, q, *factors):
        return solve_refined(KKTFactors.from_tensors(factors), Q, A, p, q, refine)

    @staticmethod
    def setup_context(ctx, inputs, output):
        refine, Q, A, p, q, *factors = inputs
        x, lam = output
        ctx.refine, ctx.shapes = refine, (Q.shape, A.shape, p.shape, q.shape)
        ctx.save_for_backward(Q, A, x, lam, *factors)
        ctx.save_for_forward(Q, A, x, lam, *factors)

    # Pullback. z = (x; λ) = K⁻¹r with r = (p; q) and K symmetric. Perturbing,
    #   K ż = ṙ − K̇ z,   K̇ z = (Q̇x + Ȧᵀλ; Ȧx)   (Q̇ symmetric: Q is read as sym(Q)).
    # For adjoints z̄ = (x̄; λ̄) let w = (w_x; w_λ) = K⁻ᵀ z̄ = K⁻¹ z̄ (the same factors). Then
    #   ⟨z̄, ż⟩ = ⟨w, ṙ − K̇z⟩ = ⟨w_x, ṗ⟩ + ⟨w_λ, q̇⟩ − ⟨w_x xᵀ, Q̇⟩ − ⟨w_x λᵀ + x w_λᵀ, Ȧᵀ⟩
    # so p̄ = w_x, q̄ = w_λ, Q̄ = −½(w_x xᵀ + x w_xᵀ) (the symmetric part: Q̇ is symmetric),
    # Ā = −(w_λ xᵀ + λ w_xᵀ), each summed over the batch dims its input was broadcast along;
    # both are one rank-2 GEMM. w comes from this Function again, so the
    # backward is itself differentiable (double backward) and reuses the factors.
    @staticmethod
    def backward(ctx, x_bar, lam_bar):
        Q, A, x, lam, *factors = ctx.saved_tensors
        Q_shape, A_shape, p_shape, q_shape = ctx.shapes
        need = ctx.needs_input_grad
        w_x, w_l = _FactoredKKTSolve.apply(ctx.refine, Q, A, x_bar, lam_bar, *factors)
        Q_bar = A_bar = p_bar = q_bar = None
        if need[1]:
            Q_bar = _outer_sum(torch.stack([w_x, x], -1) * -0.5, torch.stack([x, w_x], -1),
                               Q_shape)
        if need[2]:
            A_bar = _outer_sum(-torch.stack([w_l, lam], -1), torch.stack([x, w_x], -1), A_shape)
        if need[3]:
            p_bar = w_x.sum_to_size(p_shape)
        if need[4]:
            q_bar = w_l.sum_to_size(q_shape)
        return (None, Q_bar, A_bar, p_bar, q_bar) + (None,) * len(factors)

    # Pushforward: ż = K⁻¹(ṙ − K̇z) = K⁻¹(ṗ − Q̇x − Ȧᵀλ; q̇ − Ȧx), with the same factors.
    @staticmethod
    def jvp(ctx, _refine, Q_dot, A_dot, p_dot, q_dot, *_factors):
        Q, A, x, lam, *factors = ctx.saved_tensors
        rx, rq = tangent_rhs(x, lam, p_dot, q_dot, Q_dot, A_dot)
        fac = KKTFactors.from_tensors(factors)
        return solve_refined(fac, Q, A, rx, rq, ctx.refine)

    @staticmethod
    def vmap(info, in_dims, refine, Q, A, p, q, *factors):
        events = _EVENT + KKTFactors.event_ndims_of(len(factors))
        tensors = align_for_vmap(info.batch_size, in_dims[1:], (Q, A, p, q, *factors), events)
        return _FactoredKKTSolve.apply(refine, *tensors), (0, 0)


class DenseKKTBackend:
    """Batched dense backend: factor ``[[Q, Aᵀ], [A, 0]]`` once, reuse it everywhere.

    Cholesky of Q plus Cholesky of the Schur complement ``A Q⁻¹ Aᵀ`` when Q is positive
    definite (fastest), otherwise a Bunch–Kaufman LDLᵀ of the whole KKT matrix (Q need only
    be positive definite on the null space of A). Backward, double backward and JVP all
    reuse the forward factorization. Torch ops only (CPU and CUDA).

    Args:
        factorization: "auto" (Schur if Q is PD, else LDLᵀ), "schur" or "ldl".
        refine: steps of iterative refinement applied to every solve (forward, adjoint,
            tangent); default 0; 1–2 bring ill-conditioned problems to ~machine precision.
        rcond: pivot-ratio threshold for singularity (default ``N · eps``).

    >>> import torch
    >>> Q, c = torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> A, b = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    >>> x, lam = DenseKKTBackend()(Q, c, A, b)
    >>> x
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    name = "dense"

    def __init__(self, factorization: str = "auto", refine: int = 0, rcond: float | None = None):
        if factorization not in ("auto", "schur", "ldl"):
            raise ValueError(
                f"factorization must be 'auto', 'schur' or 'ldl', got {factorization!r}")
        if int(refine) < 0:
            raise ValueError(f"refine must be >= 0, got {refine}")
        self.factorization, self.refine, self.rcond = factorization, int(refine), rcond

    def __call__(self, Q: Tensor, c: Tensor, A: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        factors = _FactorKKT.apply(Q, A, self.factorization, self.rcond)
        return _FactoredKKTSolve.apply(self.refine, Q, A, -c, b, *factors)
