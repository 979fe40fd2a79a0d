"""Diagonalization backend for Sylvester-type operators: batched torch ops on any device.

With ``A = V Λ V⁻¹`` and ``B = Z M Z⁻¹`` (complex, ``torch.linalg.eig``), the operator is
diagonal in the basis ``X̃ = V⁻¹ X Z``:

    A X + X B = C   ⇔   X̃_ij = C̃_ij / (λ_i + μ_j),       C̃ = V⁻¹ C Z,  X = V X̃ Z⁻¹
    A X B − X = C   ⇔   X̃_ij = C̃_ij / (λ_i μ_j − 1).

``Mᵀ = V⁻ᵀ Λ Vᵀ``, so the adjoint operator and the Lyapunov case ``B = Aᵀ`` reuse the same
factors. The method is only as accurate as ``V`` and ``Z`` are well conditioned (errors grow
like ``cond(V) cond(Z) · eps``); a (nearly) defective matrix is caught by a bound on
``‖V‖_F ‖V⁻¹‖_F`` and raises :class:`IllConditionedEigenbasis`, on which ``backend="auto"``
falls back to the Schur backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.errors import SingularSystemError
from implicit_layers.linalg.dense import lu_factor
from implicit_layers.linalg.sylvester.operator import SylvesterFactorization, check_separation


class IllConditionedEigenbasis(SingularSystemError):
    """The eigenvector matrix of ``A`` or ``B`` is (nearly) singular: ``A`` is (nearly) defective.

    Attributes:
        short: a one-line description, e.g. ``"cond_F(V) = 3.1e+09 > 8.2e+03"``.
    """

    def __init__(self, message: str, short: str):
        super().__init__(message)
        self.short = short


def default_max_cond(dtype: torch.dtype, n: int) -> float:
    """``n · eps^(-1/4)``: ``‖V‖_F ‖V⁻¹‖_F ≥ n`` always, and the error is about ``cond² eps``."""
    return max(n, 1) * torch.finfo(dtype).eps ** -0.25


def _frobenius2(M: Tensor) -> Tensor:
    return torch.view_as_real(M).square().sum((-3, -2, -1))


class EigFactor:
    """A batch of matrices ``M = V diag(λ) V⁻¹`` (complex ``V``, ``λ``)."""

    def __init__(self, V: Tensor, V_inv: Tensor, eigvals: Tensor):
        self.V, self.V_inv, self.eigvals = V, V_inv, eigvals

    @classmethod
    def compute(cls, M: Tensor, max_cond: float | None, name: str) -> EigFactor:
        n = M.shape[-1]
        lam, V = torch.linalg.eig(M)
        LU, piv = lu_factor(V)
        eye = torch.eye(n, dtype=V.dtype, device=V.device).expand_as(V)
        V_inv = torch.linalg.lu_solve(LU, piv, eye)
        cond = (_frobenius2(V) * _frobenius2(V_inv)).sqrt()
        limit = max_cond if max_cond is not None else default_max_cond(M.dtype, n)
        bad = ~(cond <= limit)  # NaN counts as bad
        if bool(bad.any()):
            worst = float(cond.nan_to_num(float("inf")).max())
            short = f"cond_F(V) of {name} = {worst:.2e} > {limit:.2e}"
            raise IllConditionedEigenbasis(
                f"backend='eig': the eigenvectors of {name} are ill-conditioned in "
                f"{int(bad.sum())} of {bad.numel()} batch entries ({short}); {name} is "
                f"(nearly) defective. Use backend='schur' or backend='auto'.",
                short,
            )
        return cls(V, V_inv, lam)

    @property
    def T(self) -> EigFactor:
        return EigFactor(self.V_inv.mT, self.V.mT, self.eigvals)


class EigSylvester(SylvesterFactorization):
    """Diagonalized ``A X + X B`` or ``A X B − X``; batched torch ops, runs on any device.

    Build it with :meth:`factor`; the adjoint (:attr:`T`) shares the eigendecomposition.
    """

    backend = "eig"

    def __init__(self, a: EigFactor, b: EigFactor, kind: str, inv_eigvals: Tensor):
        self.a, self.b, self.kind, self.inv_eigvals = a, b, kind, inv_eigvals

    @classmethod
    def factor(cls, A: Tensor, B: Tensor, kind: str, b_is_a_transposed: bool = False,
               rcond: float | None = None, max_cond: float | None = None) -> EigSylvester:
        a = EigFactor.compute(A.detach(), max_cond, "A")
        b = a.T if b_is_a_transposed else EigFactor.compute(B.detach(), max_cond, "B")
        return cls(a, b, kind, 1 / check_separation(a.eigvals, b.eigvals, kind, rcond))

    @property
    def T(self) -> EigSylvester:
        # (L*)'s eigenvalue for the pair (i, j) is still λ_i + μ_j (resp. λ_i μ_j − 1)
        return EigSylvester(self.a.T, self.b.T, self.kind, self.inv_eigvals)

    @property
    def batch_shapes(self):
        return self.a.V.shape[:-2], self.b.V.shape[:-2]

    def solve(self, C: Tensor) -> Tensor:
        a, b = self.a, self.b
        C_tilde = a.V_inv @ C.to(a.V.dtype) @ b.V
        X = a.V @ (C_tilde * self.inv_eigvals) @ b.V_inv
        return X.real.to(C.dtype)
