"""Factorizations of Sylvester-type operators: factor ``A`` and ``B`` once, solve many times.

Two operators on ``n × m`` matrices ``X`` are covered, both determined by the spectra of
``A`` (``n × n``) and ``B`` (``m × m``):

* ``kind="continuous"``: ``L(X) = A X + X B``  (Sylvester; Lyapunov with ``B = Aᵀ``),
  eigenvalues ``λ_i + μ_j``;
* ``kind="stein"``:      ``L(X) = A X B − X``  (discrete Lyapunov with ``B = Aᵀ``),
  eigenvalues ``λ_i μ_j − 1``.

Under the Frobenius inner product the adjoint ``L*`` is the operator of the same kind built
from ``(Aᵀ, Bᵀ)``; a spectral factor of ``Mᵀ`` is a relabelling of the factor of ``M``, so
:attr:`SylvesterFactorization.T` costs nothing and backward/JVP solves reuse the forward's
factors. Backends: :mod:`~implicit_layers.linalg.sylvester.schur` (real Schur form + LAPACK ``trsyl``,
CPU) and :mod:`~implicit_layers.linalg.sylvester.eig` (batched torch eigendecomposition, any
device); :func:`~implicit_layers.linalg.sylvester.factor.factor_sylvester` picks one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from implicit_layers.errors import SingularSystemError
from implicit_layers.linalg.dense import default_rcond

KINDS = ("continuous", "stein")


class SylvesterFactorization(ABC):
    """Solves ``L(X) = C`` for a factored operator ``L`` of the given ``kind``.

    Attributes:
        kind: ``"continuous"`` or ``"stein"``.
        backend: what solved it, e.g. ``"schur"``, ``"eig"`` or
            ``"schur (eig fallback: ...)"``.
        batch_shape_a, batch_shape_b: batch shapes of the factored ``A`` and ``B``.
    """

    kind: str
    backend: str

    @abstractmethod
    def solve(self, C: Tensor) -> Tensor:
        """``X`` with ``L(X) = C``; ``C (*batch, n, m)`` broadcasts against the factors."""

    @property
    @abstractmethod
    def T(self) -> SylvesterFactorization:
        """The factorization of the adjoint operator ``L*`` (built from ``Aᵀ, Bᵀ``)."""

    @property
    @abstractmethod
    def batch_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Batch shapes of the factored ``A`` and ``B``."""

    def fits(self, A: Tensor, B: Tensor) -> bool:
        """Whether this factorization was computed for matrices shaped like ``A`` and ``B``.

        Leading singleton batch dimensions are ignored (they do not change broadcasting).
        """
        sa, sb = self.batch_shapes
        return _strip_ones(A.shape[:-2]) == _strip_ones(sa) and _strip_ones(
            B.shape[:-2]
        ) == _strip_ones(sb)


def _strip_ones(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def operator_eigvals(lam_a: Tensor, lam_b: Tensor, kind: str) -> Tensor:
    """Eigenvalues ``(*batch, n, m)`` of ``L`` from those of ``A (*, n)`` and ``B (*, m)``."""
    if kind == "continuous":
        return lam_a.unsqueeze(-1) + lam_b.unsqueeze(-2)
    return lam_a.unsqueeze(-1) * lam_b.unsqueeze(-2) - 1


def check_separation(lam_a: Tensor, lam_b: Tensor, kind: str, rcond: float | None) -> Tensor:
    """The eigenvalues of ``L`` (:func:`operator_eigvals`), after checking none is (nearly) zero.

    Raises :class:`SingularSystemError` if one is.
    ``L`` is singular iff ``λ_i + μ_j = 0`` (continuous) or ``λ_i μ_j = 1`` (stein) for some
    pair. The threshold is ``rcond`` times the operator's scale (``max|λ| + max|μ|``, resp.
    ``1 + max|λ| max|μ|``); ``rcond`` defaults to ``(n + m) · eps``.
    """
    n, m = lam_a.shape[-1], lam_b.shape[-1]
    real_dtype = lam_a.real.dtype
    if rcond is None:
        rcond = default_rcond(real_dtype, n + m)
    eigvals = operator_eigvals(lam_a, lam_b, kind)
    # moduli with abs (hypot for complex), not √(re² + im²): the squares overflow for |λ| ≳
    # 1e154 and underflow for |λ| ≲ 1e-154, a false alarm on a representable solution
    gap = eigvals.abs().flatten(-2).amin(-1)
    top_a, top_b = lam_a.abs().amax(-1), lam_b.abs().amax(-1)
    scale = top_a + top_b if kind == "continuous" else 1 + top_a * top_b
    bad = gap <= rcond * scale.clamp_min(torch.finfo(real_dtype).tiny)
    if bool(bad.any()):
        which = "λ_i(A) + λ_j(B) ≈ 0" if kind == "continuous" else "λ_i(A) λ_j(B) ≈ 1"
        raise SingularSystemError(
            f"the {kind} Sylvester/Lyapunov operator is singular or nearly so ({which}) in "
            f"{int(bad.sum())} of {bad.numel()} batch entries: smallest |eigenvalue| "
            f"{float(gap.min()):.3e} vs threshold {rcond:.1e} × scale; the solution does not "
            f"exist or is not unique"
        )
    return eigvals
