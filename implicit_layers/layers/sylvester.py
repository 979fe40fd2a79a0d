"""Sylvester-type layers: ``A X + X B = C`` and, through them, the Lyapunov equations.

Each layer is an :class:`~implicit_layers.ImplicitLayer` whose residual is linear in ``X``,

    Sylvester:            f = A X + X B − C           (operator L(X) = A X + X B)
    Lyapunov:             f = A P + P Aᵀ + Q          (L(P) = A P + P Aᵀ)
    discrete Lyapunov:    f = A P Aᵀ − P + Q          (L(P) = A P Aᵀ − P, a Stein operator)

so ``J = ∂f/∂X = L``. The forward solver factors ``L`` once (real Schur form or
eigendecomposition, :mod:`implicit_layers.linalg.sylvester`) and solves; the factorization is
left in ``SolveResult.aux``, where the core's :class:`~implicit_layers.FactorizationAdjoint`
reuses it: the adjoint ``L*`` is the operator of the transposed factors, so backward, JVP and
double backward never factor again.

Derivation (continuous Sylvester; the others follow from the chain rule, which the generic
backward applies to their residuals). Pushforward: ``L(Ẋ) = Ċ − Ȧ X − X Ḃ``. Pullback: with
``W = L⁻*(X̄)``, i.e. ``Aᵀ W + W Bᵀ = X̄``,

    ⟨X̄, Ẋ⟩ = ⟨W, Ċ − Ȧ X − X Ḃ⟩   ⇒   C̄ = W,  Ā = −W Xᵀ,  B̄ = −Xᵀ W,

nothing assuming symmetry of ``C``, ``X̄`` or ``W``. For Lyapunov, ``Ā = −(W Pᵀ + Wᵀ P)`` with
``W`` solving ``Aᵀ W + W A = −P̄``, the same up to the sign convention of ``f``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from implicit_layers.checks import check_positive, check_same_dtype_device, check_tensor
from implicit_layers.core.adjoint import FactorizationAdjoint
from implicit_layers.core.broadcast import sum_to
from implicit_layers.core.layer import ImplicitLayer
from implicit_layers.linalg.base import Factorization
from implicit_layers.linalg.sylvester import BACKENDS, SylvesterFactorization, factor_sylvester
from implicit_layers.solvers.base import SolveResult
from implicit_layers.stats import SolverStats


class FlatSylvester(Factorization):
    """A :class:`SylvesterFactorization` seen as a factorization of ``J`` on flattened
    unknowns ``(*extra, *batch, n·m)``; the transposed solve is the adjoint operator's."""

    def __init__(self, fac: SylvesterFactorization, n: int, m: int):
        self.fac, self.n, self.m = fac, n, m
        self.backend = fac.backend

    def solve(self, b: Tensor, transpose: bool = False) -> Tensor:
        fac = self.fac.T if transpose else self.fac
        return fac.solve(b.reshape(*b.shape[:-1], self.n, self.m)).reshape(b.shape)


class SylvesterSolver:
    """The forward solve of a Sylvester-type layer: factor ``L`` from the inputs, solve once.

    Args:
        kind: ``"continuous"`` (``A X + X B``) or ``"stein"`` (``A X B − X``).
        operands: ``inputs ↦ (A, B, C)`` with ``L(X) = C`` the equation to solve.
        b_is_a_transposed: ``B = Aᵀ`` (Lyapunov): ``A`` is factored once.
        backend, rcond, eig_max_cond: see :class:`SylvesterLayer`.
    """

    name = "sylvester"

    def __init__(self, kind, operands, b_is_a_transposed, backend, rcond, eig_max_cond):
        self.kind, self.operands, self.b_is_a_transposed = kind, operands, b_is_a_transposed
        self.backend, self.rcond, self.eig_max_cond = backend, rcond, eig_max_cond

    def solve(self, problem, y0: Tensor) -> SolveResult:
        A, B, C = self.operands(problem.data)
        fac = factor_sylvester(A, B, self.kind, backend=self.backend,
                               b_is_a_transposed=self.b_is_a_transposed, rcond=self.rcond,
                               eig_max_cond=self.eig_max_cond)
        X = fac.solve(C).expand(y0.shape)
        stats = SolverStats.exact(fac.backend, y0.shape[:-2], device=y0.device)
        return SolveResult(X.contiguous(), stats, FlatSylvester(fac, *y0.shape[-2:]))


def check_sylvester_inputs(A: Tensor, B: Tensor, C: Tensor, names=("A", "B", "C")) -> None:
    """``A (*, n, n)``, ``B (*, m, m)``, ``C (*, n, m)``: broadcastable batches, one dtype.

    NaN/Inf values are rejected (``ValueError`` naming the argument) when the solve runs.
    ``names`` may repeat a name (``B = Aᵀ``): each is then checked and reported once.
    """
    na, nb, nc = names
    for name, t in zip(names, (A, B, C), strict=True):  # values: in the implicit function
        check_tensor(name, t, min_ndim=2, finite=False)
    for name, t in ((na, A), (nb, B)):
        if t.shape[-1] != t.shape[-2]:
            raise ValueError(f"{name} must be square (*, n, n), got shape {tuple(t.shape)}")
    if C.shape[-2:] != (A.shape[-1], B.shape[-1]):
        raise ValueError(
            f"{nc} must have shape (*, {A.shape[-1]}, {B.shape[-1]}) to match {na}"
            f"{'' if nb == na else ' and ' + nb}, got {tuple(C.shape)}")
    shapes = {na: A.shape[:-2], nb: B.shape[:-2], nc: C.shape[:-2]}
    try:
        torch.broadcast_shapes(*shapes.values())
    except RuntimeError as err:
        listed = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
        raise ValueError(f"batch shapes do not broadcast: {listed}") from err
    check_same_dtype_device(dict(zip(names, (A, B, C), strict=True)))


class SylvesterTypeLayer(ImplicitLayer):
    """Shared plumbing of the Sylvester and Lyapunov layers: the solver, the backend choice,
    one call of the implicit function.

    Subclasses set :attr:`kind`, :attr:`names` and :attr:`b_is_a_transposed` and implement
    :meth:`residual` (static) and :meth:`operands` (static, ``inputs ↦ (A, B, C)``).

    Attributes:
        last_backend: the backend the most recent call used (what ``"auto"`` picked).
        stats: :class:`~implicit_layers.stats.LayerStats` of the most recent call.
    """

    kind = "continuous"
    names: tuple[str, ...] = ("A", "B", "C")
    b_is_a_transposed = False
    #: ``(inputs, X) ↦ f``, the equation's residual (a static method of each subclass)
    residual: Callable[[tuple[Tensor, ...], Tensor], Tensor]
    #: ``(inputs, X, W) ↦ (−(∂f/∂input_i)ᵀ W)_i`` in closed form (a static method of each
    #: subclass; the generic VJP through torch.func cost ~10 % of a backward at n = 200)
    pullback: Callable[[tuple[Tensor, ...], Tensor, Tensor], tuple[Tensor, ...]]
    #: ``inputs ↦ (A, B, C)`` of ``A X + X B = C`` (a static method of each subclass)
    operands: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]

    def __init__(self, backend: str = "auto", rcond: float | None = None,
                 eig_max_cond: float | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_positive("rcond", rcond, allow_zero=True)
        check_positive("eig_max_cond", eig_max_cond)
        solver = SylvesterSolver(self.kind, self.operands, self.b_is_a_transposed, backend,
                                 rcond, eig_max_cond)
        super().__init__(self.residual, solver, FactorizationAdjoint(factor=self._factor_at),
                         event_ndim=2)
        self.backend, self.rcond, self.eig_max_cond = backend, rcond, eig_max_cond
        self.last_backend: str | None = None

    def _factor_at(self, lin) -> FlatSylvester:
        """The operator's factorization at a point without a forward solve (under vmap)."""
        xs, y, _ = lin.problem.split(lin.z)
        A, B, _ = self.operands(xs)
        fac = factor_sylvester(A, B, self.kind, backend=self.backend,
                               b_is_a_transposed=self.b_is_a_transposed, rcond=self.rcond,
                               eig_max_cond=self.eig_max_cond)
        return FlatSylvester(fac, *y.shape[-2:])

    def _call(self, *inputs: Tensor) -> Tensor:
        for name, t in zip(self.names, inputs, strict=True):
            check_tensor(name, t, min_ndim=2, finite=False)
        A, B, C = self.operands(inputs)
        check_sylvester_inputs(A, B, C, self.names[:1] + self.names[-2:] if len(inputs) == 2
                               else self.names)
        batch = torch.broadcast_shapes(*(t.shape[:-2] for t in inputs))
        y0 = torch.zeros(*batch, A.shape[-1], B.shape[-1], dtype=A.dtype, device=A.device)
        pullback = self.pullback

        def input_pullback(z, w: Tensor, wanted) -> dict[int, Tensor]:
            xs, X = z[:len(inputs)], z[len(inputs)]
            grads = pullback(xs, X, w)
            return {i: sum_to(grads[i], xs[i].shape) for i in wanted}

        X = self._solve(inputs, y0, x_names=self.names, broadcasts=True,
                        x_event_ndims=(2,) * len(inputs), sample_check=False,
                        input_pullback=input_pullback)
        forward = self.stats.forward
        self.last_backend = forward.solver if forward is not None else None
        return X

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class SylvesterLayer(SylvesterTypeLayer):
    """Solves the Sylvester equation ``A X + X B = C``; differentiable in ``A``, ``B`` and ``C``.

    Args:
        backend: ``"schur"`` (Bartels–Stewart, SciPy/LAPACK, CPU only: data moved
            explicitly), ``"eig"`` (batched torch eigendecomposition, any device) or
            ``"auto"`` (eig for batches of matrices with ``n <= 64`` or data off the CPU,
            Schur otherwise, Schur if the eigenvectors are ill-conditioned); the choice is in
            ``last_backend``.
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

    @staticmethod
    def residual(x: tuple[Tensor, ...], X: Tensor) -> Tensor:
        A, B, C = x
        return A @ X + X @ B - C

    @staticmethod
    def pullback(x: tuple[Tensor, ...], X: Tensor, W: Tensor) -> tuple[Tensor, ...]:
        # ⟨W, Ȧ X + X Ḃ − Ċ⟩ = ⟨W Xᵀ, Ȧ⟩ + ⟨Xᵀ W, Ḃ⟩ − ⟨W, Ċ⟩, negated
        return -(W @ X.mT), -(X.mT @ W), W

    @staticmethod
    def operands(x: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return x

    def forward(self, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        return self._call(A, B, C)


def sylvester(A: Tensor, B: Tensor, C: Tensor, *, backend: str = "auto") -> Tensor:
    """``X`` with ``A X + X B = C``; see :class:`SylvesterLayer`."""
    return SylvesterLayer(backend)(A, B, C)
