"""Choosing and running a backend for Sylvester-type operators (see :mod:`.operator`).

``backend="schur"`` is Bartels–Stewart on the real Schur form (SciPy/LAPACK, CPU only);
``backend="eig"`` diagonalizes with ``torch.linalg.eig`` (batched, any device); ``"auto"``
picks one per call and records its choice in the factorization's ``backend`` attribute.
"""

from __future__ import annotations

from torch import Tensor

from implicit_layers.linalg.sylvester.eig import EigSylvester, IllConditionedEigenbasis
from implicit_layers.linalg.sylvester.operator import KINDS, SylvesterFactorization
from implicit_layers.linalg.sylvester.schur import SchurSylvester

BACKENDS = ("auto", "schur", "eig")

#: ``backend="auto"`` uses the eigendecomposition for batches of matrices up to this size
AUTO_EIG_MAX_N = 64


def choose_backend(A: Tensor) -> str:
    """``backend="auto"``: eig for batches of small matrices or off-CPU data, else Schur."""
    n = A.shape[-1]
    batch = A.shape[:-2].numel()
    if A.device.type != "cpu" or (batch >= 2 and n <= AUTO_EIG_MAX_N):
        return "eig"
    return "schur"


def factor_sylvester(
    A: Tensor,
    B: Tensor,
    kind: str,
    *,
    backend: str = "auto",
    b_is_a_transposed: bool = False,
    rcond: float | None = None,
    eig_max_cond: float | None = None,
) -> SylvesterFactorization:
    """Factor the operator ``L`` of ``kind`` built from ``A`` and ``B`` (plain tensors).

    Args:
        A, B: ``(*batch_a, n, n)`` and ``(*batch_b, m, m)``; no autograd through this call.
        kind: ``"continuous"`` or ``"stein"``.
        backend: ``"schur"`` (CPU, LAPACK), ``"eig"`` (torch, any device) or ``"auto"``,
            which uses eig for batches of matrices with ``n <= 64`` or data off the CPU and
            Schur otherwise, and falls back to Schur when the eigenvectors are
            ill-conditioned. The choice is recorded in ``.backend``.
        b_is_a_transposed: promise that ``B = Aᵀ`` (Lyapunov): ``A`` is factored once.
        rcond: singularity threshold, see :func:`check_separation`.
        eig_max_cond: eig backend's bound on ``‖V‖_F ‖V⁻¹‖_F``, see
            :class:`~implicit_layers.linalg.sylvester.eig.EigSylvester`.

    Raises:
        SingularSystemError: ``L`` is (nearly) singular, or ``backend="eig"`` and ``A`` or
            ``B`` is (nearly) defective.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    chosen = choose_backend(A) if backend == "auto" else backend
    if chosen == "eig":
        try:
            return EigSylvester.factor(A, B, kind, b_is_a_transposed, rcond, eig_max_cond)
        except IllConditionedEigenbasis as err:
            if backend != "auto":
                raise
            fac = SchurSylvester.factor(A, B, kind, b_is_a_transposed, rcond)
            fac.backend = f"schur (eig fallback: {err.short})"
            return fac
    return SchurSylvester.factor(A, B, kind, b_is_a_transposed, rcond)
