"""Sparse LDLᵀ of a symmetric saddle-point (KKT) matrix, factored once, solved many times.

    K = [[H, Bᵀ], [B, 0]]    (H: n × n, B: m × n; SciPy sparse, CPU, float64)

QDLDL factors symmetric matrices without pivoting (after an AMD ordering), which needs
every leading block to be nonsingular: true for a *quasi-definite* matrix, not for K (its
zero block). As OSQP does, we factor the regularized, quasi-definite

    K_δ = K + diag(δ I_n, −δ I_m),     δ = ``delta`` · max |K|,

and recover the solution of the unregularized system by iterative refinement
``z ← z + K_δ⁻¹(r − K z)``, which contracts by about ``δ ‖K⁻¹‖`` per step. A refinement that
does not reach the tolerance means K is singular (or too ill-conditioned) and raises
:class:`SingularSystemError`. The signs of D give the inertia of K_δ, which equals that of K
when K is nonsingular (Sylvester's law).

CPU-only (SciPy/qdldl): tensors are moved to NumPy by the callers.
"""

from __future__ import annotations

import numpy as np
import qdldl
import scipy.sparse as sp

from implicit_layers.errors import SingularSystemError


class SparseSaddleLDL:
    """Regularized sparse LDLᵀ of ``[[H, Bᵀ], [B, 0]]`` with refinement to the exact system.

    Args:
        K: the symmetric (n + m) × (n + m) matrix, any SciPy sparse format.
        n: size of the (1, 1) block.
        delta: relative regularization (default 1e-9).
        max_refine: most refinement steps per solve.

    Attributes:
        inertia: (positive, negative) pivot counts of the factored K_δ.
        refine_steps: refinement steps the last solve took.

    >>> import numpy as np, scipy.sparse as sp
    >>> K = sp.csc_matrix(np.array([[2., 1.], [1., 0.]]))
    >>> fac = SparseSaddleLDL(K, n=1)
    >>> np.round(fac.solve(np.array([1., 1.])), 12)
    array([ 1., -1.])
    """

    def __init__(self, K, n: int, delta: float = 1e-9, max_refine: int = 20):
        K = sp.csc_matrix(K, dtype=np.float64)
        N = K.shape[0]
        self.K, self.n, self.max_refine = K, n, max_refine
        scale = float(abs(K).max()) if K.nnz else 1.0
        self.delta = delta * scale
        reg = np.concatenate([np.full(n, self.delta), np.full(N - n, -self.delta)])
        K_reg = sp.triu(K + sp.diags(reg), format="csc")
        try:
            self._solver = qdldl.Solver(K_reg)
        except RuntimeError as err:  # a zero pivot: K_δ is not even quasi-definite
            raise SingularSystemError(f"sparse LDLᵀ of the KKT matrix failed: {err}") from err
        _, d, _ = self._solver.factors()
        positive = int((d > 0).sum())
        self.inertia = (positive, N - positive)
        self.refine_steps = 0

    def solve(self, r: np.ndarray) -> np.ndarray:
        """Solve ``K z = r`` for ``r`` of shape (N,) or (N, k); raise if refinement stalls."""
        r = np.asarray(r, dtype=np.float64)
        cols = r.reshape(r.shape[0], -1)
        out = np.stack([self._solve_one(cols[:, j]) for j in range(cols.shape[1])], axis=1)
        return out.reshape(r.shape)

    def _solve_one(self, r: np.ndarray) -> np.ndarray:
        eps = np.finfo(np.float64).eps
        z = self._solver.solve(r)
        best = np.inf
        for step in range(self.max_refine + 1):
            res = r - self.K @ z
            err = np.abs(res).max()
            tol = 8 * eps * (self._norm_K() * np.abs(z).max() + np.abs(r).max())
            if err <= tol:
                self.refine_steps = step
                return z
            if step == self.max_refine or not err < 0.9 * best:  # stalled
                break
            best = err
            z = z + self._solver.solve(res)
        raise SingularSystemError(
            f"the KKT matrix is singular or too ill-conditioned for the sparse backend: "
            f"refinement stalled at residual {err:.2e} (tolerance {tol:.2e})")

    def _norm_K(self) -> float:
        if not hasattr(self, "_K_max"):
            self._K_max = float(abs(self.K).sum(axis=1).max()) if self.K.nnz else 0.0
        return self._K_max
