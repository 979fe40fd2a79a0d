"""Dense batched equality-QP backend: autograd Functions that factor the KKT matrix once.

``_SolveEqQP(Q, c, A, b)`` factors ``K = [[Q, Aᵀ], [A, 0]]`` and solves
``K (x; λ) = (−c; b)``; the factor tensors are extra, non-differentiable outputs that its
backward and JVP reuse. When a backward is itself recorded (double backward, torch.func),
the adjoint solve goes through ``_FactoredKKTSolve(kind, Q, A, p, q, *factors)``, which
solves ``K (x; λ) = (p; q)`` with given factors and is differentiable the same way: the
forward factorization is the only one, however many times (and to whatever order) the
result is differentiated.

Q is read as its symmetric part ``sym(Q) = (Q + Qᵀ)/2``: the factorization is of sym(Q),
products use ``sym(Q) v = (Qv + Qᵀv)/2`` (no symmetrized copy), and the gradient of Q is
symmetric. Torch ops only: runs on CPU and CUDA.

Small problems cost torch-op and Python overhead rather than flops, so the common path is
lean: one Function call (applied without ``Function.apply``'s per-call signature bind), one
host sync (the factorization's safety check read together with the finiteness of the
result, which also covers the NaN/Inf check of the inputs), and a plain backward that
records nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers
from torch.autograd import Function

from implicit_layers.core.checks import check_tensor
from implicit_layers.linalg.kkt.equality import (
    SMALL_KKT_NUMEL,
    KKTFactors,
    factor_kind,
    fallback_factor,
    kkt_matvec,
    matmul,
    tangent_rhs,
    try_schur,
)

#: event ndims of (Q, A, p, q)
_EVENT = (2, 2, 1, 1)


def apply(function: type[Function], *args):
    """``function.apply(*args)`` without the ``inspect.signature`` bind that
    ``Function.apply`` runs on every call when ``setup_context`` is defined (it only fills
    in default arguments, which these forwards do not have, and costs ~40 µs: as much as
    solving a small QP). Inside torch.func transforms the full ``apply`` is used."""
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return super(Function, function).apply(*unwrap_dead_wrappers(args))


def sym(Q: Tensor) -> Tensor:
    """``(Q + Qᵀ)/2`` in one pass, up to rounding (exactly Q when Q is symmetric), stored
    column-major so that LAPACK can factor it in place; not differentiable: used only to
    factor."""
    out = torch.empty_like(Q, memory_format=torch.contiguous_format).mT
    return torch.lerp(Q, Q.mT, 0.5, out=out)


def solve_refined(fac: KKTFactors, Q: Tensor, A: Tensor, p: Tensor, q: Tensor | None,
                  refine: int):
    """Solve ``K z = (p; q)`` (``q = None``: zero) with ``refine`` steps of iterative
    refinement ``z ← z + K⁻¹((p; q) − K z)`` (Q read as sym(Q))."""
    x, lam = fac.solve(p, q)
    for _ in range(refine):
        Kx, Kl = kkt_matvec(Q, A, x, lam)
        dx, dl = fac.solve(p - Kx, -Kl if q is None else q - Kl)
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


def solve_eq_qp(Q, c, A, b, backend) -> tuple[Tensor, Tensor, KKTFactors]:
    """``(x, λ, factors)`` of the QP, with a single host sync on the common path: the Schur
    factorization's safety check and the finiteness of (x, λ) are read together. Non-finite
    inputs always make one of them fail (a NaN/Inf in Q or A spoils a Cholesky pivot, one in
    c or b reaches x or λ); only then are the inputs checked one by one, to name the bad
    one, and the LDLᵀ fallback (with its diagnosis of a singular K) is run."""
    method, rcond, refine = backend.factorization, backend.rcond, backend.refine
    p = -c
    if method != "ldl":  # Cholesky of sym(Q) in place: sym(Q) is not kept
        fac, usable, schur = try_schur(sym(Q), A, rcond, backend.small_numel, overwrite_q=True)
        x, lam = solve_refined(fac, Q, A, p, b, refine)
        if bool(usable & torch.isfinite(x.sum() + lam.sum())):
            return x, lam, fac
        check_finite_inputs(Q, c, A, b)
        if bool(schur.usable(rcond)):  # and (x, λ) overflowed: return what was computed
            return x, lam, fac
    else:
        check_finite_inputs(Q, c, A, b)
    fac = fallback_factor(sym(Q), A, method, rcond)
    return (*solve_refined(fac, Q, A, p, b, refine), fac)


def check_finite_inputs(Q, c, A, b) -> None:
    """ValueError naming the first input with a NaN or Inf."""
    for name, t in zip("QcAb", (Q, c, A, b), strict=True):
        check_tensor(name, t)


def _outer_sum(U: Tensor, V: Tensor, shape) -> Tensor:
    """``Σ_k U[..., k] V[..., k]ᵀ`` for stacked vectors ``U (*, r, k)``, ``V (*, c, k)``,
    summed over the batch dims that ``shape`` does not have (broadcast inputs)."""
    if len(shape) == 2 and U.ndim > 2:  # one matrix shared by the batch: a single GEMM
        return U.movedim(-2, 0).flatten(1) @ V.movedim(-2, 0).flatten(1).mT
    out = matmul(U, V.mT)
    return out if out.shape == shape else out.sum_to_size(shape)


def _sum_to_size(t: Tensor, shape) -> Tensor:
    return t if t.shape == shape else t.sum_to_size(shape)


# Pullback. z = (x; λ) = K⁻¹r with r = (p; q) and K symmetric. Perturbing,
#   K ż = ṙ − K̇ z,   K̇ z = (Q̇x + Ȧᵀλ; Ȧx)   (Q̇ symmetric: Q is read as sym(Q)).
# For adjoints z̄ = (x̄; λ̄) let w = (w_x; w_λ) = K⁻ᵀ z̄ = K⁻¹ z̄ (the same factors). Then
#   ⟨z̄, ż⟩ = ⟨w, ṙ − K̇z⟩ = ⟨w_x, ṗ⟩ + ⟨w_λ, q̇⟩ − ⟨w_x xᵀ, Q̇⟩ − ⟨w_x λᵀ + x w_λᵀ, Ȧᵀ⟩
# so p̄ = w_x, q̄ = w_λ, Q̄ = −½(w_x xᵀ + x w_xᵀ) (the symmetric part: Q̇ is symmetric),
# Ā = −(w_λ xᵀ + λ w_xᵀ), each summed over the batch dims its input was broadcast along;
# both are one rank-2 GEMM with the same right factor [x, w_x]. When the backward itself is
# recorded (double backward, or under torch.func), w comes from _FactoredKKTSolve, a
# Function again, so that it is differentiable; the factors are reused either way.
def kkt_pullback(ctx, x_bar, lam_bar, need) -> tuple:
    """``(Q̄, Ā, p̄, q̄)`` (None where ``need`` = (Q, A, p, q) is False) from the tensors
    saved by :func:`save_kkt_solve`; ``x_bar`` or ``lam_bar`` may be None (zero)."""
    Q, A, x, lam, *factors = ctx.saved_tensors
    Q_shape, A_shape, p_shape, q_shape = ctx.shapes
    if x_bar is None:
        x_bar = torch.zeros_like(x)
    if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
        if lam_bar is None:
            lam_bar = torch.zeros_like(lam)
        w_x, w_l = apply(_FactoredKKTSolve, ctx.refine, ctx.kind, Q, A, x_bar, lam_bar,
                         *factors)
    else:  # a plain backward: nothing to record
        w_x, w_l = solve_refined(ctx.kind(*factors), Q, A, x_bar, lam_bar, ctx.refine)
    Q_bar = A_bar = None
    if need[0] or need[1]:
        right = torch.stack([x, w_x], -1)
    if need[0]:
        Q_bar = _outer_sum(torch.stack([w_x, x], -1) * -0.5, right, Q_shape)
    if need[1]:
        A_bar = _outer_sum(torch.stack([w_l, lam], -1).neg(), right, A_shape)
    p_bar = _sum_to_size(w_x, p_shape) if need[2] else None
    q_bar = _sum_to_size(w_l, q_shape) if need[3] else None
    return Q_bar, A_bar, p_bar, q_bar


# Pushforward: ż = K⁻¹(ṙ − K̇z) = K⁻¹(ṗ − Q̇x − Ȧᵀλ; q̇ − Ȧx), with the same factors.
def kkt_pushforward(ctx, Q_dot, A_dot, p_dot, q_dot) -> tuple[Tensor, Tensor]:
    Q, A, x, lam, *factors = ctx.saved_tensors
    rx, rq = tangent_rhs(x, lam, p_dot, q_dot, Q_dot, A_dot)
    return solve_refined(ctx.kind(*factors), Q, A, rx, rq, ctx.refine)


def save_kkt_solve(ctx, refine: int, kind, Q, A, p_shape, q_shape, x, lam, factors) -> None:
    """Save what :func:`kkt_pullback` and :func:`kkt_pushforward` read."""
    ctx.refine, ctx.kind, ctx.shapes = refine, kind, (Q.shape, A.shape, p_shape, q_shape)
    ctx.save_for_backward(Q, A, x, lam, *factors)
    ctx.save_for_forward(Q, A, x, lam, *factors)


class _SolveEqQP(Function):
    """``(Q, c, A, b, backend) -> (x, λ, *factors)``: factor K once and solve
    ``K (x; λ) = (−c; b)``; the factors are non-differentiable outputs (for the backward and
    JVP)."""

    @staticmethod
    def forward(Q, c, A, b, backend):
        x, lam, fac = solve_eq_qp(Q, c, A, b, backend)
        return (x, lam, *fac.tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        Q, c, A, b, backend = inputs
        x, lam, *factors = output
        ctx.mark_non_differentiable(*factors)
        ctx.set_materialize_grads(False)
        save_kkt_solve(ctx, backend.refine, factor_kind(factors), Q, A, c.shape, b.shape, x,
                       lam, factors)

    @staticmethod
    def backward(ctx, x_bar, lam_bar, *_factor_grads):  # p = −c: c̄ = −p̄
        need = ctx.needs_input_grad
        Q_bar, A_bar, p_bar, b_bar = kkt_pullback(ctx, x_bar, lam_bar,
                                                  (need[0], need[2], need[1], need[3]))
        return Q_bar, None if p_bar is None else -p_bar, A_bar, b_bar, None

    @staticmethod
    def jvp(ctx, Q_dot, c_dot, A_dot, b_dot, _backend):
        p_dot = None if c_dot is None else -c_dot
        n_factors = len(ctx.kind.event_ndims)
        return (*kkt_pushforward(ctx, Q_dot, A_dot, p_dot, b_dot), *(None,) * n_factors)

    @staticmethod
    def vmap(info, in_dims, Q, c, A, b, backend):
        tensors = align_for_vmap(info.batch_size, in_dims[:4], (Q, c, A, b), (2, 1, 2, 1))
        out = _SolveEqQP.apply(*tensors, backend)
        return out, (0,) * len(out)


class _FactoredKKTSolve(Function):
    """``(refine, kind, Q, A, p, q, *factors) -> (x, λ)`` solving ``K (x; λ) = (p; q)``
    with the given factors (of class ``kind``): the adjoint solve of a recorded backward,
    itself differentiable."""

    @staticmethod
    def forward(refine, kind, Q, A, p, q, *factors):
        return solve_refined(kind(*factors), Q, A, p, q, refine)

    @staticmethod
    def setup_context(ctx, inputs, output):
        refine, kind, Q, A, p, q, *factors = inputs
        save_kkt_solve(ctx, refine, kind, Q, A, p.shape, q.shape, *output, factors)

    @staticmethod
    def backward(ctx, x_bar, lam_bar):
        grads = kkt_pullback(ctx, x_bar, lam_bar, ctx.needs_input_grad[2:6])
        return (None, None, *grads) + (None,) * len(ctx.kind.event_ndims)

    @staticmethod
    def jvp(ctx, _refine, _kind, Q_dot, A_dot, p_dot, q_dot, *_factors):
        return kkt_pushforward(ctx, Q_dot, A_dot, p_dot, q_dot)

    @staticmethod
    def vmap(info, in_dims, refine, kind, Q, A, p, q, *factors):
        events = _EVENT + kind.event_ndims
        tensors = align_for_vmap(info.batch_size, in_dims[2:], (Q, A, p, q, *factors), events)
        return _FactoredKKTSolve.apply(refine, kind, *tensors), (0, 0)


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
        small_numel: up to this batch size × (n + m)² the Schur factors are assembled
            into one triangular factor of K (fewer torch ops, for small problems whose
            time is op overhead; 0 disables).

    >>> import torch
    >>> Q, c = torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> A, b = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    >>> x, lam = DenseKKTBackend()(Q, c, A, b)
    >>> x
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    name = "dense"
    #: the layer leaves the NaN/Inf check to this backend (it costs no extra host sync here)
    checks_finite = True

    def __init__(self, factorization: str = "auto", refine: int = 0, rcond: float | None = None,
                 small_numel: int = SMALL_KKT_NUMEL):
        if factorization not in ("auto", "schur", "ldl"):
            raise ValueError(
                f"factorization must be 'auto', 'schur' or 'ldl', got {factorization!r}")
        if int(refine) < 0:
            raise ValueError(f"refine must be >= 0, got {refine}")
        self.factorization, self.refine, self.rcond = factorization, int(refine), rcond
        self.small_numel = int(small_numel)

    def __call__(self, Q: Tensor, c: Tensor, A: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        x, lam, *_factors = apply(_SolveEqQP, Q, c, A, b, self)
        return x, lam
