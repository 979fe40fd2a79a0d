"""Differentiable continuous and discrete Lyapunov equations.

    continuous:  A P + P Aᵀ + Q = 0        (Sylvester with B = Aᵀ, C = −Q)
    discrete:    A P Aᵀ − P + Q = 0        (Stein with B = Aᵀ, C = −Q)

Both are :class:`~implicit_layers.layers.sylvester.SylvesterTypeLayer` with ``B = Aᵀ``: one
spectral factorization of ``A`` (real Schur form or eigendecomposition) serves the forward
solve, the adjoint solve of the backward pass and the tangent solve of forward mode.

Derivation (continuous; the generic backward differentiates the residual
``f = A P + P Aᵀ + Q``, which is this computation). Pushforward:
``A Ṗ + Ṗ Aᵀ + (Ȧ P + P Ȧᵀ + Q̇) = 0``, another Lyapunov equation with the same operator.
Pullback: with ``W`` solving
``Aᵀ W + W A + P̄ = 0`` (the adjoint operator, i.e. the transposed triangular solve),

    ⟨P̄, Ṗ⟩ = ⟨W, Ȧ P + P Ȧᵀ + Q̇⟩ = ⟨W Pᵀ + Wᵀ P, Ȧ⟩ + ⟨W, Q̇⟩
    ⇒  Q̄ = W,   Ā = W Pᵀ + Wᵀ P,

which is ``2 W P`` only when both ``W`` and ``P`` are symmetric (symmetric ``Q`` and ``P̄``).
Discrete: ``A Ṗ Aᵀ − Ṗ + (Ȧ P Aᵀ + A P Ȧᵀ + Q̇) = 0``; with ``Aᵀ W A − W + P̄ = 0``,
``Q̄ = W`` and ``Ā = W A Pᵀ + Wᵀ A P``.
"""

from __future__ import annotations

from torch import Tensor

from implicit_layers.layers.sylvester import SylvesterTypeLayer


class LyapunovLayer(SylvesterTypeLayer):
    """Solves the continuous Lyapunov equation ``A P + P Aᵀ + Q = 0`` for ``P``.

    Differentiable in ``A`` and ``Q``; exact for non-symmetric ``Q`` and any cotangent
    (``P`` is symmetric when ``Q`` is). Forward, backward and JVP share one factorization.

    Args:
        backend: ``"schur"`` (Bartels–Stewart: SciPy/LAPACK real Schur form + ``trsyl``, CPU
            only, data moved explicitly), ``"eig"`` (batched ``torch.linalg.eig``, any device)
            or ``"auto"`` (eig for batches of matrices with ``n <= 64`` or data off the CPU,
            else Schur; Schur when the eigenvectors are ill-conditioned). The choice of the
            last call is in ``last_backend``.
        rcond: singularity threshold on ``min |λ_i + λ_j|`` relative to ``2 max |λ|``
            (default ``2n · eps``).
        eig_max_cond: eig backend's bound on ``‖V‖_F ‖V⁻¹‖_F`` (default ``n · eps^(-1/4)``).

    Shapes: ``A (*, n, n)``, ``Q (*, n, n)`` with broadcastable batch dims.

    Raises:
        ValueError: non-square or mismatched shapes, mixed dtypes/devices, NaN/Inf.
        SingularSystemError: ``λ_i(A) + λ_j(A) ≈ 0`` for some pair (e.g. eigenvalues on the
            imaginary axis), or ``backend="eig"`` and ``A`` is (nearly) defective.

    >>> import torch, implicit_layers as il
    >>> A = torch.tensor([[-1., 2.], [0., -3.]], dtype=torch.float64, requires_grad=True)
    >>> Q = torch.eye(2, dtype=torch.float64)
    >>> P = il.LyapunovLayer()(A, Q)
    >>> torch.allclose(A @ P + P @ A.mT + Q, torch.zeros(2, 2, dtype=torch.float64))
    True
    >>> P.trace().backward(); A.grad.shape
    torch.Size([2, 2])
    """

    kind, names, b_is_a_transposed = "continuous", ("A", "Q"), True

    @staticmethod
    def residual(x: tuple[Tensor, ...], P: Tensor) -> Tensor:
        A, Q = x
        return A @ P + P @ A.mT + Q

    @staticmethod
    def pullback(x: tuple[Tensor, ...], P: Tensor, W: Tensor) -> tuple[Tensor, ...]:
        return -(W @ P.mT + W.mT @ P), -W  # −(Ā, Q̄) of the module docstring

    @staticmethod
    def operands(x: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        A, Q = x
        return A, A.mT, -Q

    def forward(self, A: Tensor, Q: Tensor) -> Tensor:
        return self._call(A, Q)


class DiscreteLyapunovLayer(SylvesterTypeLayer):
    """Solves the discrete Lyapunov (Stein) equation ``A P Aᵀ − P + Q = 0`` for ``P``.

    Same arguments, guarantees and backends as :class:`LyapunovLayer`; the operator is
    singular when ``λ_i(A) λ_j(A) ≈ 1`` (e.g. an eigenvalue on the unit circle). The Schur
    backend reduces it to a Sylvester equation by a Cayley transform of the Schur form.

    >>> import torch, implicit_layers as il
    >>> A = torch.tensor([[0.5, 0.2], [0., -0.3]], dtype=torch.float64)
    >>> Q = torch.eye(2, dtype=torch.float64)
    >>> P = il.DiscreteLyapunovLayer()(A, Q)
    >>> torch.allclose(A @ P @ A.mT - P + Q, torch.zeros(2, 2, dtype=torch.float64))
    True
    """

    kind, names, b_is_a_transposed = "stein", ("A", "Q"), True

    @staticmethod
    def residual(x: tuple[Tensor, ...], P: Tensor) -> Tensor:
        A, Q = x
        return A @ P @ A.mT - P + Q

    @staticmethod
    def pullback(x: tuple[Tensor, ...], P: Tensor, W: Tensor) -> tuple[Tensor, ...]:
        A = x[0]
        return -(W @ A @ P.mT + W.mT @ A @ P), -W  # −(Ā, Q̄) of the module docstring

    @staticmethod
    def operands(x: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        A, Q = x
        return A, A.mT, -Q

    def forward(self, A: Tensor, Q: Tensor) -> Tensor:
        return self._call(A, Q)


def lyapunov(A: Tensor, Q: Tensor, *, backend: str = "auto") -> Tensor:
    """``P`` with ``A P + P Aᵀ + Q = 0``; see :class:`LyapunovLayer`."""
    return LyapunovLayer(backend)(A, Q)


def discrete_lyapunov(A: Tensor, Q: Tensor, *, backend: str = "auto") -> Tensor:
    """``P`` with ``A P Aᵀ − P + Q = 0``; see :class:`DiscreteLyapunovLayer`."""
    return DiscreteLyapunovLayer(backend)(A, Q)
