"""Differentiable Sylvester solves ``A X + X B = C`` (and the Stein form ``A X B − X = C``).

:class:`SylvesterSolve` is the one autograd Function behind :class:`SylvesterLayer`,
:class:`~implicit_layers.layers.lyapunov.LyapunovLayer` and
:class:`~implicit_layers.layers.lyapunov.DiscreteLyapunovLayer`. The operator ``L`` is factored
once per call (:mod:`implicit_layers.linalg.sylvester.factor`); the adjoint and tangent equations are
solved by calling :class:`SylvesterSolve` again with the same factors (transposed for the
adjoint), so double backward and forward-over-reverse differentiate through those solves too.

Derivation, ``L(X) = C`` with ``L(X) = A X + X B`` ("continuous") or ``A X B − X`` ("stein"):

    pushforward:  L(Ẋ) = Ċ − Ȧ X − X Ḃ                 (continuous)
                  L(Ẋ) = Ċ − Ȧ X B − A X Ḃ             (stein)
    inner product, W := L⁻*(X̄), i.e. Aᵀ W + W Bᵀ = X̄ resp. Aᵀ W Bᵀ − W = X̄:
                  ⟨X̄, Ẋ⟩ = ⟨X̄, L⁻¹(R)⟩ = ⟨L⁻*(X̄), R⟩ = ⟨W, R⟩
    pullback:     C̄ = W,  Ā = −W Xᵀ,      B̄ = −Xᵀ W          (continuous)
                  C̄ = W,  Ā = −W Bᵀ Xᵀ,   B̄ = −Xᵀ Aᵀ W       (stein)
    using ⟨W, Ȧ M⟩ = ⟨W Mᵀ, Ȧ⟩ and ⟨W, M Ḃ⟩ = ⟨Mᵀ W, Ḃ⟩. Nothing assumes symmetry of C, X̄ or W.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from implicit_layers.core.checks import check_same_dtype_device, check_tensor
from implicit_layers.linalg.sylvester.factor import BACKENDS, factor_sylvester
from implicit_layers.linalg.sylvester.operator import SylvesterFactorization
from implicit_layers.stats import LayerStats, SolverStats


class LazySylvesterFactors:
    """The factorization that one layer call shares between its forward, adjoint and tangent solves.

    It is computed on first use inside :meth:`SylvesterSolve.forward`, where the tensors are
    plain (also under ``torch.func`` transforms). :attr:`T` gives the adjoint operator's factors.
    """

    def __init__(self, kind: str, backend: str = "auto", b_is_a_transposed: bool = False,
                 rcond: float | None = None, eig_max_cond: float | None = None,
                 names: tuple[str, str, str] = ("A", "B", "C"),
                 fac: SylvesterFactorization | None = None):
        self.kind, self.backend, self.b_is_a_transposed = kind, backend, b_is_a_transposed
        self.rcond, self.eig_max_cond, self.names, self.fac = rcond, eig_max_cond, names, fac

    def fresh(self) -> LazySylvesterFactors:
        return LazySylvesterFactors(self.kind, self.backend, self.b_is_a_transposed,
                                    self.rcond, self.eig_max_cond, self.names)

    @property
    def T(self) -> LazySylvesterFactors:
        out = self.fresh()  # B = Aᵀ still holds for the transposed pair (Aᵀ, Bᵀ)
        out.fac = None if self.fac is None else self.fac.T
        return out

    def for_inputs(self, A: Tensor, B: Tensor) -> LazySylvesterFactors:
        """Self if its factors (if any) were computed for matrices shaped like ``A, B``."""
        return self if self.fac is None or self.fac.fits(A, B) else self.fresh()

    def get(self, A: Tensor, B: Tensor, C: Tensor) -> SylvesterFactorization:
        if self.fac is None:  # the primal solve: validate the values the user passed, here
            # where they are plain tensors (also under vmap); B = Aᵀ needs no second look
            todo = (True, not self.b_is_a_transposed, True)
            for name, t, check in zip(self.names, (A, B, C), todo, strict=True):
                if check and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{name} contains NaN or Inf")
            self.fac = factor_sylvester(
                A, B, self.kind, backend=self.backend, b_is_a_transposed=self.b_is_a_transposed,
                rcond=self.rcond, eig_max_cond=self.eig_max_cond,
            )
        return self.fac


class SylvesterSolve(torch.autograd.Function):
    """``X = L⁻¹(C)`` for the operator of ``factors.kind`` built from ``A`` and ``B``."""

    @staticmethod
    def forward(A: Tensor, B: Tensor, C: Tensor, factors: LazySylvesterFactors) -> Tensor:
        return factors.get(A, B, C).solve(C)

    @staticmethod
    def setup_context(ctx, inputs, output):
        A, B, _, factors = inputs
        ctx.factors = factors
        ctx.shapes = (A.shape, B.shape, inputs[2].shape)
        ctx.save_for_backward(A, B, output)
        ctx.save_for_forward(A, B, output)

    @staticmethod
    def backward(ctx, X_bar: Tensor):
        A, B, X = ctx.saved_tensors
        shape_a, shape_b, shape_c = ctx.shapes
        W = SylvesterSolve.apply(A.mT, B.mT, X_bar, ctx.factors.T)  # Aᵀ W + W Bᵀ = X̄ (or stein)
        A_bar = B_bar = C_bar = None
        stein = ctx.factors.kind == "stein"
        if ctx.needs_input_grad[0]:
            A_bar = -(W @ (B.mT @ X.mT if stein else X.mT))
            A_bar = A_bar.sum_to_size(shape_a)
        if ctx.needs_input_grad[1]:
            B_bar = -((X.mT @ A.mT if stein else X.mT) @ W)
            B_bar = B_bar.sum_to_size(shape_b)
        if ctx.needs_input_grad[2]:
            C_bar = W.sum_to_size(shape_c)
        return A_bar, B_bar, C_bar, None

    @staticmethod
    def jvp(ctx, A_dot, B_dot, C_dot, _):
        A, B, X = ctx.saved_tensors
        stein = ctx.factors.kind == "stein"
        R = C_dot if C_dot is not None else torch.zeros_like(X)
        if A_dot is not None:
            R = R - (A_dot @ (X @ B) if stein else A_dot @ X)
        if B_dot is not None:
            R = R - ((A @ X) @ B_dot if stein else X @ B_dot)
        return SylvesterSolve.apply(A, B, R, ctx.factors)

    @staticmethod
    def vmap(info, in_dims, A, B, C, factors):
        # Move each vmapped dim to the front (size 1 where unbatched) and pad the remaining
        # batch dims to a common count, so the batched solve broadcasts sample by sample.
        dims = in_dims[:3]
        logical = max(t.ndim - 2 - (d is not None) for t, d in zip((A, B, C), dims, strict=True))

        def align(t, d):
            t = t.unsqueeze(0) if d is None else t.movedim(d, 0)
            pad = logical - (t.ndim - 3)
            return t.reshape(t.shape[:1] + (1,) * pad + t.shape[1:])

        A, B, C = (align(t, d) for t, d in zip((A, B, C), dims, strict=True))
        return SylvesterSolve.apply(A, B, C, factors.for_inputs(A, B)), 0


def check_sylvester_inputs(A: Tensor, B: Tensor, C: Tensor, names=("A", "B", "C")) -> None:
    """``A (*, n, n)``, ``B (*, m, m)``, ``C (*, n, m)``: broadcastable batches, one dtype.

    NaN/Inf values are rejected (``ValueError`` naming the argument) when the solve runs.
    """
    na, nb, nc = names
    for name, t in zip(names, (A, B, C), strict=True):  # values: in LazySylvesterFactors.get
        check_tensor(name, t, min_ndim=2, finite=False)
    for name, t in ((na, A), (nb, B)):
        if t.shape[-1] != t.shape[-2]:
            raise ValueError(f"{name} must be square (*, n, n), got shape {tuple(t.shape)}")
    if C.shape[-2:] != (A.shape[-1], B.shape[-1]):
        raise ValueError(
            f"{nc} must have shape (*, {A.shape[-1]}, {B.shape[-1]}) to match {na} and {nb}, "
            f"got {tuple(C.shape)}"
        )
    try:
        torch.broadcast_shapes(A.shape[:-2], B.shape[:-2], C.shape[:-2])
    except RuntimeError as err:
        raise ValueError(
            f"batch shapes of {na} {tuple(A.shape[:-2])}, {nb} {tuple(B.shape[:-2])} and "
            f"{nc} {tuple(C.shape[:-2])} do not broadcast"
        ) from err
    check_same_dtype_device({na: A, nb: B, nc: C})


class SylvesterTypeLayer(nn.Module):
    """Shared plumbing of the Sylvester and Lyapunov layers: backend choice and stats.

    Attributes:
        last_backend: the backend the most recent call used (what ``"auto"`` picked).
        stats: :class:`~implicit_layers.stats.LayerStats` of the most recent call.
    """

    def __init__(self, backend: str = "auto", rcond: float | None = None,
                 eig_max_cond: float | None = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend, self.rcond, self.eig_max_cond = backend, rcond, eig_max_cond
        self.last_backend: str | None = None
        self.stats = LayerStats()

    def _solve(self, A, B, C, kind, b_is_a_transposed, names) -> Tensor:
        factors = LazySylvesterFactors(kind, self.backend, b_is_a_transposed, self.rcond,
                                       self.eig_max_cond, names)
        X = SylvesterSolve.apply(A, B, C, factors)
        self.last_backend = factors.fac.backend if factors.fac is not None else None
        self.stats = LayerStats(forward=SolverStats.exact(
            self.last_backend or self.backend, X.shape[:-2], device=X.device))
        return X

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class SylvesterLayer(SylvesterTypeLayer):
    """Solves the Sylvester equation ``A X + X B = C``; differentiable in ``A``, ``B`` and ``C``.

    Args:
        backend: ``"schur"`` (Bartels–Stewart, SciPy/LAPACK, CPU), ``"eig"`` (batched torch
            eigendecomposition, any device) or ``"auto"`` (eig for batches of matrices with
            ``n <= 64`` or data off the CPU, Schur otherwise, Schur if the eigenvectors are
            ill-conditioned); the choice is in ``last_backend``.
        rcond: singularity threshold on ``min |λ_i(A) + λ_j(B)|`` relative to the spectra's
            scale (default ``(n + m) · eps``).
        eig_max_cond: eig backend's bound on ``‖V‖_F ‖V⁻¹‖_F`` (default ``n · eps^(-1/4)``).

    Shapes: ``A (*, n, n)``, ``B (*, m, m)``, ``C (*, n, m)`` with broadcastable batches.

    Raises:
        ValueError: malformed input (shapes, dtypes, NaN/Inf), named.
        SingularSystemError: ``λ_i(A) + λ_j(B) ≈ 0`` for some pair (no unique solution).

    >>> import torch, implicit_layers as il
    >>> A = torch.tensor([[2., 1.], [0., 3.]], dtype=torch.float64, requires_grad=True)
    >>> B = torch.tensor([[1., 0.], [1., 1.]], dtype=torch.float64)
    >>> C = torch.eye(2, dtype=torch.float64)
    >>> X = il.SylvesterLayer()(A, B, C)
    >>> torch.allclose(A @ X + X @ B, C)
    True
    """

    def forward(self, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        check_sylvester_inputs(A, B, C)
        return self._solve(A, B, C, "continuous", False, ("A", "B", "C"))


def sylvester(A: Tensor, B: Tensor, C: Tensor, *, backend: str = "auto") -> Tensor:
    """``X`` with ``A X + X B = C``; see :class:`SylvesterLayer`."""
    return SylvesterLayer(backend)(A, B, C)
