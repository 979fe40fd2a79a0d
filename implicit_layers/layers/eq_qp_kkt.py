"""Dense batched factorizations of the KKT matrix of an equality-constrained QP.

    K = [[Q, Aᵀ], [A, 0]],      K (x; λ) = (p; q)

Two factorizations, both computed once and then used for any number of solves (forward,
iterative refinement, the adjoint system of the backward, the tangent system of the JVP):

* :class:`SchurKKT` when Q is positive definite: ``Q = L Lᵀ``, ``M = L⁻¹Aᵀ`` and the Schur
  complement ``S = A Q⁻¹ Aᵀ = MᵀM = L_S L_Sᵀ``. Then, with ``u = L⁻¹p``,
  ``λ = S⁻¹(Mᵀu − q)`` and ``x = L⁻ᵀ(u − Mλ)``.
* :class:`LDLKKT` otherwise: a Bunch–Kaufman ``LDLᵀ`` of the whole (symmetric indefinite)
  K, which only needs Q positive definite on the null space of A. Its inertia (Sylvester's
  law) must be (n positive, m negative); anything else means Q is not positive definite on
  null(A), and a (numerically) zero pivot means K is singular. The error says which of
  "A's rows are dependent" and "Q is not positive definite on null(A)" holds.

A factorization travels through autograd as a tuple of plain tensors (:attr:`tensors`), so
it can be an output and an input of ``torch.autograd.Function`` and be batched by vmap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.errors import SingularSystemError
from implicit_layers.linalg.dense import check_conditioning, default_rcond


def kkt_matrix(Q: Tensor, A: Tensor) -> Tensor:
    """Assemble ``[[Q, Aᵀ], [A, 0]]`` with the broadcast batch shape of Q and A."""
    batch = torch.broadcast_shapes(Q.shape[:-2], A.shape[:-2])
    m = A.shape[-2]
    Q, A = Q.expand(*batch, *Q.shape[-2:]), A.expand(*batch, *A.shape[-2:])
    top = torch.cat([Q, A.mT], dim=-1)
    bottom = torch.cat([A, A.new_zeros(*batch, m, m)], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def sym_matvec(Q: Tensor, v: Tensor) -> Tensor:
    """``sym(Q) v = (Qv + Qᵀv)/2`` without forming sym(Q)."""
    V = v.unsqueeze(-1)
    return ((Q @ V + Q.mT @ V) * 0.5).squeeze(-1)


def kkt_matvec(Q: Tensor, A: Tensor, x: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """``K (x; λ) = (sym(Q)x + Aᵀλ; Ax)`` on batches of vectors."""
    Qx = sym_matvec(Q, x)
    Atl = (A.mT @ lam.unsqueeze(-1)).squeeze(-1)
    return Qx + Atl, (A @ x.unsqueeze(-1)).squeeze(-1)


def dense_matvec(M: Tensor, v: Tensor, transpose: bool = False) -> Tensor:
    return ((M.mT if transpose else M) @ v.unsqueeze(-1)).squeeze(-1)


def tangent_rhs(x, lam, p_dot, q_dot, Q_dot, A_dot, sym_matvec=sym_matvec, matvec=dense_matvec):
    """``(ṗ − sym(Q̇)x − Ȧᵀλ; q̇ − Ȧx)``, the right-hand side of the tangent KKT system;
    absent (None) tangents contribute nothing. ``sym_matvec(Q̇, v)`` and
    ``matvec(Ȧ, v, transpose)`` apply tangents in the caller's storage (dense matrices, or
    values on a sparse pattern)."""
    rx, rq = torch.zeros_like(x), torch.zeros_like(lam)
    if p_dot is not None:
        rx = rx + p_dot
    if q_dot is not None:
        rq = rq + q_dot
    if Q_dot is not None:
        rx = rx - sym_matvec(Q_dot, x)
    if A_dot is not None:
        rx = rx - matvec(A_dot, lam, True)
        rq = rq - matvec(A_dot, x, False)
    return rx, rq


def _columns(solve, fac_batch_ndim: int, rhs: Tensor) -> Tensor:
    """Apply ``solve`` to vectors ``rhs (*batch, N)``; an unbatched factor sees one matrix
    whose columns are all the right-hand sides (one BLAS-3 call instead of many)."""
    if fac_batch_ndim == 0 and rhs.ndim > 1:
        cols = rhs.reshape(-1, rhs.shape[-1]).mT
        return solve(cols).mT.reshape(rhs.shape)
    return solve(rhs.unsqueeze(-1)).squeeze(-1)


class KKTFactors:
    """A factored KKT matrix: ``solve(p, q) -> (x, λ)``; ``tensors`` rebuilds it."""

    #: event ndims of each tensor in :attr:`tensors` (used by the vmap rules)
    event_ndims: tuple[int, ...] = ()
    name = "KKT"

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def solve(self, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @staticmethod
    def from_tensors(tensors) -> KKTFactors:
        # the two factorizations are told apart by their number of tensors
        return SchurKKT(*tensors) if len(tensors) == 3 else LDLKKT(*tensors)

    @staticmethod
    def event_ndims_of(count: int) -> tuple[int, ...]:
        return SchurKKT.event_ndims if count == 3 else LDLKKT.event_ndims


class SchurKKT(KKTFactors):
    """Cholesky of Q and of the Schur complement ``A Q⁻¹ Aᵀ`` (Q positive definite)."""

    event_ndims = (2, 2, 2)
    name = "dense-schur"

    def __init__(self, L: Tensor, M: Tensor, L_S: Tensor):
        self.L, self.M, self.L_S = L, M, L_S

    @property
    def tensors(self):
        return self.L, self.M, self.L_S

    @classmethod
    def factor(cls, Q: Tensor, A: Tensor, rcond: float | None) -> SchurKKT | None:
        """Factor, or return None when Q or the Schur complement is not safely PD."""
        L = _safe_cholesky(Q, rcond)
        if L is None:
            return None
        M = torch.linalg.solve_triangular(L, A.mT, upper=False)  # L⁻¹Aᵀ, (*, n, m)
        L_S = _safe_cholesky(M.mT @ M, rcond)
        return None if L_S is None else cls(L, M, L_S)

    def solve(self, p, q):
        fb = self.L.ndim - 2
        u = _columns(lambda r: torch.linalg.solve_triangular(self.L, r, upper=False), fb, p)
        Mtu = (self.M.mT @ u.unsqueeze(-1)).squeeze(-1)
        lam = _columns(lambda r: torch.cholesky_solve(r, self.L_S), fb, Mtu - q)
        v = u - (self.M @ lam.unsqueeze(-1)).squeeze(-1)
        x = _columns(lambda r: torch.linalg.solve_triangular(self.L.mT, r, upper=True), fb, v)
        return x, lam


class LDLKKT(KKTFactors):
    """Bunch–Kaufman ``LDLᵀ`` of the whole KKT matrix (Q PD on null(A) suffices)."""

    event_ndims = (2, 1)
    name = "dense-ldl"

    def __init__(self, LD: Tensor, pivots: Tensor):
        self.LD, self.pivots = LD, pivots

    @property
    def tensors(self):
        return self.LD, self.pivots

    @classmethod
    def factor(cls, Q: Tensor, A: Tensor, rcond: float | None) -> LDLKKT:
        K = kkt_matrix(Q, A)
        n, N = Q.shape[-1], K.shape[-1]
        LD, piv, info = torch.linalg.ldl_factor_ex(K)
        eig = _block_eigenvalues(LD, piv)
        mags = eig.abs()
        rcond = rcond if rcond is not None else default_rcond(K.dtype, N)
        tiny = torch.finfo(K.dtype).tiny
        singular = (info > 0) | (mags.amin(-1) <= rcond * mags.amax(-1).clamp_min(tiny))
        singular = singular | ~torch.isfinite(eig).all(-1)
        wrong_inertia = (eig > 0).sum(-1) != n
        if bool((singular | wrong_inertia).any()):
            raise SingularSystemError(_diagnose(Q, A, singular, wrong_inertia))
        return cls(LD, piv)

    def solve(self, p, q):
        n = p.shape[-1]
        batch = torch.broadcast_shapes(p.shape[:-1], q.shape[:-1])
        r = torch.cat([p.expand(*batch, n), q.expand(*batch, q.shape[-1])], dim=-1)
        LD, piv = self.LD, self.pivots
        if LD.ndim > 2 and LD.shape[:-2] != batch:  # ldl_solve's own broadcasting crashes
            full = torch.broadcast_shapes(batch, LD.shape[:-2])
            LD = LD.expand(*full, *LD.shape[-2:]).contiguous()
            piv = piv.expand(*full, piv.shape[-1]).contiguous()
            r = r.expand(*full, r.shape[-1])
        solve = lambda rhs: torch.linalg.ldl_solve(LD, piv, rhs)  # noqa: E731
        z = _columns(solve, LD.ndim - 2, r)
        return z[..., :n], z[..., n:]


def factor_kkt(Q: Tensor, A: Tensor, method: str = "auto", rcond: float | None = None):
    """Factor ``[[Q, Aᵀ], [A, 0]]`` (Q symmetric) by ``method`` in {"auto", "schur", "ldl"}.

    "auto" uses the Schur form when Q and A Q⁻¹Aᵀ are safely positive definite and the
    LDLᵀ otherwise.
    Raises:
        SingularSystemError: K singular, or Q not positive definite on null(A) (or not
            positive definite at all with ``method="schur"``); the message says which.
    """
    if method in ("auto", "schur"):
        fac = SchurKKT.factor(Q, A, rcond)
        if fac is not None:
            return fac
        if method == "schur":
            LDLKKT.factor(Q, A, rcond)  # raises with the precise diagnosis if K is bad
            raise SingularSystemError(
                "factorization='schur' needs Q and A Q⁻¹Aᵀ safely positive definite (a "
                "Cholesky failed or is too ill-conditioned); use 'auto' or 'ldl' when Q is "
                "only positive definite on the null space of A")
    return LDLKKT.factor(Q, A, rcond)


def _safe_cholesky(S: Tensor, rcond: float | None) -> Tensor | None:
    """Cholesky factor of S, or None when it fails or S looks worse conditioned than
    ``rcond`` (default √eps: a singular PSD matrix still gives pivots of order √eps, and the
    Schur route squares the conditioning; the LDLᵀ of K is then the safer route)."""
    L, info = torch.linalg.cholesky_ex(S)
    if bool((info > 0).any()):
        return None
    rcond = rcond if rcond is not None else torch.finfo(S.dtype).eps ** 0.5
    try:  # cond(S) ≥ (max/min pivot)²: compare squared pivots
        check_conditioning(L.diagonal(dim1=-2, dim2=-1) ** 2, rcond, "S")
    except SingularSystemError:
        return None
    return L


def _block_eigenvalues(LD: Tensor, piv: Tensor) -> Tensor:
    """Eigenvalues of the block-diagonal D of ``torch.linalg.ldl_factor`` (LAPACK sytrf,
    lower): a negative pivot pair marks a 2×2 block; runs of negative pivots pair up from
    their start. By Sylvester's law their signs are the inertia of the factored matrix."""
    d = LD.diagonal(dim1=-2, dim2=-1)
    off = torch.nn.functional.pad(LD.diagonal(offset=-1, dim1=-2, dim2=-1), (0, 1))
    neg = piv < 0
    idx = torch.arange(d.shape[-1], device=d.device).expand_as(piv)
    starts = neg & ~torch.nn.functional.pad(neg[..., :-1], (1, 0))
    run_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    first = neg & ((idx - run_start) % 2 == 0)  # first row of a 2×2 block
    second = torch.nn.functional.pad(first[..., :-1], (1, 0))
    # for the block [[a, e], [e, c]] starting at k: mean ± radius
    a, c = d, torch.nn.functional.pad(d[..., 1:], (0, 1))
    mean, radius = (a + c) / 2, torch.sqrt(((a - c) / 2) ** 2 + off**2)
    hi, lo = mean + radius, mean - radius
    lo_shift = torch.nn.functional.pad(lo[..., :-1], (1, 0))
    return torch.where(first, hi, torch.where(second, lo_shift, d))


def _diagnose(Q: Tensor, A: Tensor, singular: Tensor, wrong_inertia: Tensor) -> str:
    """Explain a bad KKT matrix; only runs on the error path (an SVD of A)."""
    m = A.shape[-2]
    deficient = torch.linalg.matrix_rank(A) < m
    deficient = deficient.expand(singular.shape) if deficient.ndim else deficient
    bad = singular | wrong_inertia
    total = bad.numel()
    if bool((bad & deficient).any()):
        k = int((bad & deficient).sum())
        return (f"the KKT matrix is singular: A's rows are linearly dependent (A is "
                f"rank-deficient) in {k} of {total} batch entries")
    k = int(bad.sum())
    kind = "singular" if bool(singular.any()) else "not a minimum (wrong inertia)"
    return (f"the KKT matrix is {kind}: Q is not positive definite on the null space of A "
            f"in {k} of {total} batch entries")
