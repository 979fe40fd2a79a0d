"""Dense batched equality-QP backend: factor the KKT matrix once, reuse it everywhere.

The forward solver of :class:`~implicit_layers.EqualityQPLayer` for dense inputs: it factors
``K = [[sym(Q), Aᵀ], [A, 0]]`` (:mod:`implicit_layers.linalg.kkt.equality`), solves
``K (x; λ) = (−c; b)`` and leaves the factorization in ``SolveResult.aux`` as a
:class:`KKTFactorization`, which the backward, the JVP and every higher derivative reuse
through the core's :class:`~implicit_layers.FactorizationAdjoint` (``K`` is symmetric: the
transposed solve is the same solve).

Q is read as its symmetric part ``sym(Q) = (Q + Qᵀ)/2``: the factorization is of sym(Q),
products use ``sym(Q) v = (Qv + Qᵀv)/2`` (no symmetrized copy), and the gradient of Q is
symmetric. Torch ops only: runs on CPU and CUDA.

Small problems cost torch-op and Python overhead rather than flops, so the common path is
lean: one host sync (the factorization's safety check read together with the finiteness of
the result, which also covers the NaN/Inf check of the inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.checks import check_tensor
from implicit_layers.linalg.base import Factorization
from implicit_layers.linalg.kkt.equality import (
    SMALL_KKT_NUMEL,
    KKTFactors,
    dense_matvec,
    fallback_factor,
    kkt_matvec,
    try_schur,
)
from implicit_layers.solvers.base import SolveResult
from implicit_layers.stats import SolverStats


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


class KKTFactorization(Factorization):
    """A factored KKT matrix as a :class:`~implicit_layers.linalg.Factorization` of the
    layer's ``J = ∂f/∂(x; λ) = K`` on stacked vectors ``(*extra, *batch, n + m)``, with the
    backend's refinement steps against the exact K (plain tensors: no autograd)."""

    def __init__(self, fac: KKTFactors, Q: Tensor, A: Tensor, refine: int):
        self.fac, self.Q, self.A, self.refine = fac, Q, A, refine
        self.stats = None

    def solve(self, b: Tensor, transpose: bool = False) -> Tensor:  # K is symmetric
        n = self.Q.shape[-1]
        x, lam = solve_refined(self.fac, self.Q, self.A, b[..., :n], b[..., n:], self.refine)
        return torch.cat([x, lam], -1)


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
        finite, solves = torch.isfinite(x.sum() + lam.sum()), _solves(A, b, x)
        if bool(usable & finite & solves):
            return x, lam, fac
        check_finite_inputs(Q, c, A, b)
        if bool(schur.usable(rcond) & (solves | ~finite)):  # (x, λ) may have overflowed
            return x, lam, fac
    else:
        check_finite_inputs(Q, c, A, b)
    fac = fallback_factor(sym(Q), A, method, rcond)
    return (*solve_refined(fac, Q, A, p, b, refine), fac)


def _solves(A: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """Whether ``Ax = b`` holds to ``√eps (‖A‖‖x‖ + ‖b‖)`` (∞-norms, every sample). The
    Schur path computes ``x = Q⁻¹(−c − Aᵀλ)``, whose stationarity holds by construction; when
    Q is tiny next to A and null(A) is small that is a difference of nearly equal terms and
    the error shows in ``Ax − b`` (Q·1e-16 with n = m returned x off by 4 without a word)."""
    size = torch.addcmul(_abs_max(b), _abs_max(A.flatten(-2)), _abs_max(x))
    return (_abs_max(dense_matvec(A, x) - b) <= torch.finfo(x.dtype).eps ** 0.5 * size).all()


def _abs_max(t: Tensor) -> Tensor:
    """``max |t|`` over the last dim in one pass, without an ``|t|`` temporary (0 if empty)."""
    if t.shape[-1] == 0:
        return t.new_zeros(t.shape[:-1])
    lo, hi = torch.aminmax(t, dim=-1)
    return torch.maximum(-lo, hi)


def check_finite_inputs(Q, c, A, b) -> None:
    """ValueError naming the first input with a NaN or Inf."""
    for name, t in zip("QcAb", (Q, c, A, b), strict=True):
        check_tensor(name, t)


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

    >>> import torch, implicit_layers as il
    >>> Q, c = torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> A, b = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    >>> x, lam = il.EqualityQPLayer(DenseKKTBackend())(Q, c, A, b)
    >>> x
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    name = "dense"
    #: the layer leaves the NaN/Inf check to this backend (it costs no extra host sync here)
    checks_finite = True
    #: this backend factors dense tensors (the sparse backend takes sparse ones)
    accepts_sparse = False

    def __init__(self, factorization: str = "auto", refine: int = 0, rcond: float | None = None,
                 small_numel: int = SMALL_KKT_NUMEL):
        if factorization not in ("auto", "schur", "ldl"):
            raise ValueError(
                f"factorization must be 'auto', 'schur' or 'ldl', got {factorization!r}")
        if int(refine) < 0:
            raise ValueError(f"refine must be >= 0, got {refine}")
        self.factorization, self.refine, self.rcond = factorization, int(refine), rcond
        self.small_numel = int(small_numel)

    def solve(self, problem, y0: Tensor) -> SolveResult:
        """The layer's forward solve: ``problem.data = (Q, c, A, b)``; returns ``(x; λ)``."""
        Q, c, A, b = problem.data
        x, lam, fac = solve_eq_qp(Q, c, A, b, self)
        y = torch.cat([x.expand(*y0.shape[:-1], -1), lam.expand(*y0.shape[:-1], -1)], -1)
        stats = SolverStats.exact(fac.name, y0.shape[:-1], device=y0.device)
        return SolveResult(y, stats, KKTFactorization(fac, Q, A, self.refine))
