"""Dense batched factorizations of the KKT matrix of an equality-constrained QP.

    K = [[Q, Aᵀ], [A, 0]],      K (x; λ) = (p; q)

Three forms, each computed once and then used for any number of solves (forward,
iterative refinement, the adjoint system of the backward, the tangent system of the JVP):

* :class:`SchurKKT` when Q is positive definite: ``Q = L Lᵀ``, ``M = L⁻¹Aᵀ`` and the Schur
  complement ``S = A Q⁻¹ Aᵀ = MᵀM = L_S L_Sᵀ``. Then, with ``u = L⁻¹p``,
  ``λ = S⁻¹(Mᵀu − q)`` and ``x = L⁻ᵀ(u − Mλ)``.
* :class:`SignedCholeskyKKT` for small systems (batch size × (n + m)² ≤ ``small_numel``):
  the same Schur factors assembled into one triangular ``𝓛 = [[L, 0], [Mᵀ, L_S]]`` with
  ``K = 𝓛 diag(I, −I) 𝓛ᵀ``, so that a solve is two triangular solves (at this size the
  number of torch ops, not flops, sets the time).
* :class:`LDLKKT` otherwise: a Bunch–Kaufman ``LDLᵀ`` of the whole (symmetric indefinite)
  K, which only needs Q positive definite on the null space of A. Its inertia (Sylvester's
  law) must be (n positive, m negative); anything else means Q is not positive definite on
  null(A), and a (numerically) zero pivot means K is singular. The error says which of
  "A's rows are dependent" and "Q is not positive definite on null(A)" holds.

The layer wraps them as a :class:`~implicit_layers.linalg.Factorization` of its Jacobian
(:class:`~implicit_layers.layers.eq_qp.dense.KKTFactorization`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.errors import SingularSystemError
from implicit_layers.linalg.dense import default_rcond

#: default largest batch size × (n + m)² factored as :class:`SignedCholeskyKKT` (measured on
#: CPU: it saves ~5% at (B, n, m) = (1, 10, 5) and loses from ~(8, 40, 20) on, where
#: assembling 𝓛 costs more than the torch ops it saves)
SMALL_KKT_NUMEL = 16384


def batch_shape(*shapes: torch.Size) -> torch.Size:
    """``torch.broadcast_shapes``, without its cost (~20 µs) when the shapes are equal."""
    if all(s == shapes[0] for s in shapes[1:]):
        return shapes[0]
    return torch.broadcast_shapes(*shapes)


def kkt_matrix(Q: Tensor, A: Tensor) -> Tensor:
    """Assemble ``[[Q, Aᵀ], [A, 0]]`` with the broadcast batch shape of Q and A."""
    batch = batch_shape(Q.shape[:-2], A.shape[:-2])
    m = A.shape[-2]
    Q, A = Q.expand(*batch, *Q.shape[-2:]), A.expand(*batch, *A.shape[-2:])
    top = torch.cat([Q, A.mT], dim=-1)
    bottom = torch.cat([A, A.new_zeros(*batch, m, m)], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``, calling ``torch.bmm`` directly for two 3-D operands with one batch size
    (``torch.matmul``'s dispatch costs twice a small product)."""
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] == b.shape[0]:
        return torch.bmm(a, b)
    return a @ b


def dense_matvec(M: Tensor, v: Tensor, transpose: bool = False) -> Tensor:
    """``M v`` (``Mᵀ v``) on batches of vectors. Written as the row-vector product
    ``(vᵀ Mᵀ)ᵀ``: CPU ``bmm`` with a one-column right operand was ~5× slower than with a
    one-row left operand (torch 2.13, B=32, 200×100); an unbatched M is one GEMM."""
    Mt = M if transpose else M.mT
    if M.ndim == 2:
        return v @ Mt
    return matmul(v.unsqueeze(-2), Mt).squeeze(-2)


def sym_matvec(Q: Tensor, v: Tensor) -> Tensor:
    """``sym(Q) v = (Qv + Qᵀv)/2`` without forming sym(Q)."""
    return (dense_matvec(Q, v) + dense_matvec(Q, v, True)) * 0.5


def kkt_matvec(Q: Tensor, A: Tensor, x: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """``K (x; λ) = (sym(Q)x + Aᵀλ; Ax)`` on batches of vectors."""
    return sym_matvec(Q, x) + dense_matvec(A, lam, True), dense_matvec(A, x)


def _columns(solve, fac_batch_ndim: int, rhs: Tensor) -> Tensor:
    """Apply ``solve`` to vectors ``rhs (*batch, N)``; an unbatched factor sees one matrix
    whose columns are all the right-hand sides (one BLAS-3 call instead of many)."""
    if fac_batch_ndim == 0 and rhs.ndim > 1:
        cols = rhs.reshape(-1, rhs.shape[-1]).mT
        return solve(cols).mT.reshape(rhs.shape)
    return solve(rhs.unsqueeze(-1)).squeeze(-1)


def _stacked(p: Tensor, q: Tensor | None, N: int) -> Tensor:
    """``(p; q)`` as one batch of vectors of length N (broadcast; ``q = None``: zero)."""
    if q is None:
        return torch.nn.functional.pad(p, (0, N - p.shape[-1]))
    if p.shape[:-1] != q.shape[:-1]:
        batch = torch.broadcast_shapes(p.shape[:-1], q.shape[:-1])
        p, q = p.expand(*batch, p.shape[-1]), q.expand(*batch, q.shape[-1])
    return torch.cat([p, q], -1)


class KKTFactors:
    """A factored KKT matrix: ``solve(p, q) -> (x, λ)``."""

    name = "KKT"

    def solve(self, p: Tensor, q: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(x, λ) = K⁻¹(p; q)`` on batches of vectors; ``q = None`` stands for zero."""
        raise NotImplementedError


class SchurKKT(KKTFactors):
    """Cholesky of Q and of the Schur complement ``A Q⁻¹ Aᵀ`` (Q positive definite)."""

    name = "dense-schur"
    info: Tensor  # set by :meth:`unchecked`: > 0 where a Cholesky failed

    def __init__(self, L: Tensor, M: Tensor, L_S: Tensor):
        self.L, self.M, self.L_S = L, M, L_S


    @classmethod
    def unchecked(cls, Q: Tensor, A: Tensor, overwrite_q: bool = False) -> SchurKKT:
        """Factor without any check (no host sync): see :meth:`usable`. When Q is not
        positive definite the factors are garbage (wasted work only on the way to LDLᵀ).
        ``overwrite_q=True`` factors Q in its own storage (no copy, no allocation when Q
        is column-major); the Schur complement is always factored in place."""
        L, info = _cholesky_in_place(Q) if overwrite_q else torch.linalg.cholesky_ex(Q)
        M = torch.linalg.solve_triangular(L, A.mT, upper=False)  # L⁻¹Aᵀ, (*, n, m)
        # S = MᵀM is symmetric: its transposed view is the column-major layout LAPACK wants
        L_S, info_S = _cholesky_in_place(matmul(M.mT, M).mT)
        fac = cls(L, M, L_S)
        fac.info = info + info_S  # > 0 where a Cholesky failed
        return fac

    def usable(self, rcond: float | None) -> Tensor:
        """0-d bool tensor: both Cholesky factorizations succeeded and passed
        :func:`_cholesky_ok`, in every matrix of the batch."""
        rcond = _schur_rcond(rcond, self.L.dtype)
        ok_S = _cholesky_ok(self.L_S, self.info, rcond)  # info covers both factorizations
        return _cholesky_ok(self.L, torch.zeros_like(self.info), rcond).all() & ok_S.all()

    def solve(self, p, q):
        # with one (unbatched) factor, all right-hand sides are the columns of one matrix
        fb = self.L.ndim - 2
        L, L_S = self.L, self.L_S
        trsm = torch.linalg.solve_triangular
        u = _columns(lambda r: trsm(L, r, upper=False), fb, p)
        # S⁻¹ by two triangular solves: cholesky_solve copies its operands (5× slower here)
        Mtu = dense_matvec(self.M, u, True)
        lam = _columns(lambda r: trsm(L_S.mT, trsm(L_S, r, upper=False), upper=True), fb,
                       Mtu if q is None else Mtu - q)
        v = u - dense_matvec(self.M, lam)
        x = _columns(lambda r: trsm(L.mT, r, upper=True), fb, v)
        return x, lam


class SignedCholeskyKKT(KKTFactors):
    """``K = 𝓛 diag(I, −I) 𝓛ᵀ`` with ``𝓛 = [[L, 0], [Mᵀ, L_S]]`` from the Schur factors.

    Check: ``𝓛 diag(I, −I) 𝓛ᵀ = [[LLᵀ, LM], [MᵀLᵀ, MᵀM − L_S L_Sᵀ]] = [[Q, Aᵀ], [A, 0]]``.
    With ``𝓛' = 𝓛 diag(I, −I)`` (L_S negated), ``K⁻¹ = 𝓛⁻ᵀ 𝓛'⁻¹``: two triangular solves
    of size n + m. For small systems: fewer torch ops than the Schur solve's four
    triangular solves and two products, for the same flops; the two N×N copies are why
    large systems keep :class:`SchurKKT`."""

    name = "dense-signed-cholesky"

    def __init__(self, lower: Tensor, lower_signed: Tensor):
        self.lower, self.lower_signed = lower, lower_signed


    @classmethod
    def from_schur(cls, fac: SchurKKT) -> SignedCholeskyKKT:
        L, M, L_S = fac.L, fac.M, fac.L_S
        m = M.shape[-1]
        top = torch.nn.functional.pad(L, (0, m))  # [L, 0]
        if top.shape[:-2] != M.shape[:-2]:
            top = top.expand(*M.shape[:-2], *top.shape[-2:])
        Mt = M.mT
        return cls(torch.cat([top, torch.cat([Mt, L_S], -1)], -2),
                   torch.cat([top, torch.cat([Mt, -L_S], -1)], -2))

    def quick_usable(self, info: Tensor, rcond: float | None) -> Tensor:
        """A sufficient condition for :meth:`SchurKKT.usable`, in fewer torch ops: one
        pivot ratio over the diagonal of 𝓛, i.e. the pivots of L and L_S together (if it
        holds for the union it holds for each). It can fail for a usable factorization
        whose Q and Schur complement have very different scales; then ask the Schur form."""
        lo, hi = torch.aminmax(self.lower.diagonal(dim1=-2, dim2=-1), dim=-1)
        ok = (lo > _schur_rcond(rcond, lo.dtype) ** 0.5 * hi) & torch.logical_not(info)
        return ok.all()

    def solve(self, p, q):
        n = p.shape[-1]
        r = _stacked(p, q, self.lower.shape[-1])
        trsm = torch.linalg.solve_triangular
        lower, signed = self.lower, self.lower_signed
        z = _columns(lambda r: trsm(lower.mT, trsm(signed, r, upper=False), upper=True),
                     lower.ndim - 2, r)
        return z[..., :n], z[..., n:]


class LDLKKT(KKTFactors):
    """Bunch–Kaufman ``LDLᵀ`` of the whole KKT matrix (Q PD on null(A) suffices)."""

    name = "dense-ldl"

    def __init__(self, LD: Tensor, pivots: Tensor):
        self.LD, self.pivots = LD, pivots


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
        r = _stacked(p, q, self.LD.shape[-1])
        batch = r.shape[:-1]
        LD, piv = self.LD, self.pivots
        if LD.ndim > 2 and LD.shape[:-2] != batch:  # ldl_solve's own broadcasting crashes
            full = torch.broadcast_shapes(batch, LD.shape[:-2])
            LD = LD.expand(*full, *LD.shape[-2:]).contiguous()
            piv = piv.expand(*full, piv.shape[-1]).contiguous()
            r = r.expand(*full, r.shape[-1])
        solve = lambda rhs: torch.linalg.ldl_solve(LD, piv, rhs)  # noqa: E731
        z = _columns(solve, LD.ndim - 2, r)
        return z[..., :n], z[..., n:]


def try_schur(Q: Tensor, A: Tensor, rcond: float | None, small_numel: int = SMALL_KKT_NUMEL,
              overwrite_q: bool = False) -> tuple[KKTFactors, Tensor, SchurKKT]:
    """The Schur form without a host sync: ``(factors, usable, schur)``. ``factors`` is
    ``schur`` itself or, when batch size × (n + m)² ≤ ``small_numel``, its
    :class:`SignedCholeskyKKT` form;
    ``usable`` is a 0-d bool tensor. For the small form it is the conservative
    :meth:`~SignedCholeskyKKT.quick_usable`: when it is False, ``schur.usable(rcond)`` has
    the final word. ``overwrite_q``: see :meth:`SchurKKT.unchecked`."""
    schur = SchurKKT.unchecked(Q, A, overwrite_q)
    N = Q.shape[-1] + A.shape[-2]
    if schur.M.shape[:-2].numel() * N * N <= small_numel:
        fac = SignedCholeskyKKT.from_schur(schur)
        return fac, fac.quick_usable(schur.info, rcond), schur
    return schur, schur.usable(rcond), schur


def fallback_factor(Q: Tensor, A: Tensor, method: str, rcond: float | None) -> LDLKKT:
    """LDLᵀ of K after the Schur route failed (or for ``method="ldl"``); with
    ``method="schur"``, the error explaining why the Schur route failed."""
    if method == "schur":
        LDLKKT.factor(Q, A, rcond)  # raises with the precise diagnosis if K is bad
        raise SingularSystemError(
            "factorization='schur' needs Q and A Q⁻¹Aᵀ safely positive definite (a "
            "Cholesky failed or is too ill-conditioned); use 'auto' or 'ldl' when Q is "
            "only positive definite on the null space of A")
    return LDLKKT.factor(Q, A, rcond)


def factor_kkt(Q: Tensor, A: Tensor, method: str = "auto", rcond: float | None = None,
               small_numel: int = SMALL_KKT_NUMEL) -> KKTFactors:
    """Factor ``[[Q, Aᵀ], [A, 0]]`` (Q symmetric) by ``method`` in {"auto", "schur", "ldl"}.

    "auto" uses the Schur form when Q and A Q⁻¹Aᵀ are safely positive definite and the
    LDLᵀ otherwise.
    Raises:
        SingularSystemError: K singular, or Q not positive definite on null(A) (or not
            positive definite at all with ``method="schur"``); the message says which.
    """
    if method in ("auto", "schur"):
        fac, usable, schur = try_schur(Q, A, rcond, small_numel)
        if bool(usable) or (fac is not schur and bool(schur.usable(rcond))):
            return fac
    return fallback_factor(Q, A, method, rcond)


def _cholesky_in_place(S: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.cholesky_ex(S)`` written into S's own storage. Large temporaries cost
    page faults on every call on a CPU (glibc hands freed blocks back to the OS): one
    fewer n×n buffer per factorization shows in the timings."""
    info = torch.empty(S.shape[:-2], dtype=torch.int32, device=S.device)
    return torch.linalg.cholesky_ex(S, out=(S, info))


def _schur_rcond(rcond: float | None, dtype: torch.dtype) -> float:
    return rcond if rcond is not None else torch.finfo(dtype).eps ** 0.5


def _cholesky_ok(L: Tensor, info: Tensor, rcond: float) -> Tensor:
    """Per matrix: the Cholesky succeeded and its pivots d have ``min d² > rcond · max d²``
    (False on NaN/Inf). With the default rcond = √eps the Schur route rejects matrices that
    are singular up to rounding (whose pivots are then of order √eps): it squares the
    conditioning and loses accuracy there; the LDLᵀ of K is then the safer route."""
    lo, hi = torch.aminmax(L.diagonal(dim1=-2, dim2=-1), dim=-1)
    return torch.logical_not(info) & (lo > rcond**0.5 * hi)  # d > 0 when info = 0: d, not d²


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
