"""Nonlinear least squares ``min_y ½‖r(y)‖²``: the residual vector behind the objective, its
Jacobian, and the Gauss-Newton normal equations that the solvers leave for the adjoint.

A :class:`~implicit_layers.solvers.base.RootProblem` carries one objective value per sample,
but Gauss-Newton and Levenberg-Marquardt need the residual vector ``r`` itself. The objective
of a least-squares layer is a :class:`SumOfSquares`, which returns ``½‖r‖²`` normally and ``r``
inside :func:`residual_vectors` — so the problem keeps its meaning for every minimizer
(L-BFGS sees ``½‖r‖²``) while the least-squares solvers reach ``r`` through the same callable,
also when the core has wrapped it in ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from implicit_layers.compat import func_jvp, func_vjp, in_forward_ad
from implicit_layers.errors import SingularSystemError
from implicit_layers.linalg.base import Factorization
from implicit_layers.linalg.dense import Cholesky
from implicit_layers.solvers.base import RootProblem, SolveResult
from implicit_layers.solvers.minimize.base import GradientLog, Minimizer, Objective

_ASKED: ContextVar[list | None] = ContextVar("least_squares_residual_vectors", default=None)

RANK_DEFICIENT = ("the residual's Jacobian ∂r/∂y is rank deficient, so the least-squares "
                  "minimizer is not unique (remove redundant parameters or add a regularizing "
                  "residual)")


@contextmanager
def residual_vectors() -> Iterator[list]:
    """Inside this block a :class:`SumOfSquares` returns ``r`` instead of ``½‖r‖²``; yields a
    list that records whether one answered."""
    answered: list = []
    token = _ASKED.set(answered)
    try:
        yield answered
    finally:
        _ASKED.reset(token)


class SumOfSquares(nn.Module):
    """The objective ``(x, y) ↦ ½‖r(x, y)‖²`` per sample (a module, so that a residual that
    is an ``nn.Module`` has its parameters registered).

    Args:
        residual: ``(x, y) ↦ r`` with the batch dims of ``y`` leading.
        event_ndim: trailing dims of ``y`` that form one sample.

    >>> import torch
    >>> f = SumOfSquares(lambda x, y: y - x, event_ndim=1)
    >>> x, y = torch.zeros(2, 3), torch.ones(2, 3)
    >>> f(x, y)
    tensor([1.5000, 1.5000])
    >>> with residual_vectors():
    ...     f(x, y).shape
    torch.Size([2, 3])
    """

    def __init__(self, residual: Callable, event_ndim: int):
        super().__init__()
        self.residual, self.event_ndim = residual, event_ndim

    def forward(self, x: Tensor | tuple[Tensor, ...], y: Tensor) -> Tensor:
        r = self.residual(x, y)
        batch = y.shape[: y.ndim - self.event_ndim]
        if r.shape[: len(batch)] != batch:
            raise ValueError(f"residual must keep y's batch dims {tuple(batch)} in front; "
                             f"got shape {tuple(r.shape)}")
        answered = _ASKED.get()
        if answered is not None:
            answered.append(True)
            return r
        return 0.5 * r.reshape(*batch, r.shape[len(batch):].numel()).square().sum(-1)


class NormalEquations:
    """``JᵀJ`` at the solution, factored (Cholesky) on first use, and the residual ``r``.

    Attributes:
        J: ``(*batch, m, n)``; r: ``(*batch, m)``.
    """

    def __init__(self, J: Tensor, r: Tensor):
        self.J, self.r = J, r
        self._factor: Factorization | None = None

    def factorization(self) -> Factorization:
        if self._factor is None:
            self._factor = factor_normal_matrix(self.J, "the solution")
        return self._factor


def factor_normal_matrix(J: Tensor, where: str, damping: Tensor | None = None) -> Factorization:
    """Cholesky of ``JᵀJ`` (plus ``diag(damping)``), raising ``SingularSystemError`` that
    names rank deficiency as the cause."""
    A = J.mT @ J
    if damping is not None:
        A = A + torch.diag_embed(damping)
    try:
        return Cholesky().factor(A, what="JᵀJ")
    except SingularSystemError as err:
        raise SingularSystemError(f"at {where}, {RANK_DEFICIENT}: {err}") from err


class Residuals(Objective):
    """:class:`Objective` plus the residual vector: ``r`` as ``(B, m)`` and its Jacobian on
    iterates flattened to ``(B, n)``."""

    def _r(self, y: Tensor) -> Tensor:
        with residual_vectors() as answered:
            r = self.objective(self.unflat(y))
        if not answered:
            raise ValueError(f"{self.solver} needs a least-squares problem: its objective must "
                             "be a SumOfSquares (use il.LeastSquaresLayer)")
        return r.reshape(self.B, r.shape[len(self.batch_shape):].numel())

    def residual(self, y: Tensor) -> Tensor:
        """``r`` (B, m) at ``y`` (B, n)."""
        self.evaluations += 1
        return self._r(y)

    def linearize(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(r (B, m), J (B, m, n))`` at ``y``: ``n`` batched JVPs, or ``m`` batched VJPs
        inside a classic forward-AD level (where ``torch.func.jvp`` is refused)."""
        self.evaluations += 1
        eye = torch.eye(self.n, dtype=y.dtype, device=y.device)
        if not in_forward_ad():
            basis = eye[:, None, :].expand(self.n, self.B, self.n)
            # torch's out_dims_t annotation omits None, which vmap accepts (torch 2.13)
            r, cols = torch.func.vmap(lambda t: func_jvp(self._r, (y,), (t,)),
                                      out_dims=(None, 0))(basis)  # type: ignore[arg-type]
            return r, cols.permute(1, 2, 0)
        r, vjp = func_vjp(self._r, y)
        m = r.shape[-1]
        basis = torch.eye(m, dtype=y.dtype, device=y.device)[:, None, :].expand(m, self.B, m)
        (rows,) = torch.func.vmap(vjp)(basis)
        return r, rows.permute(1, 0, 2)


class LeastSquaresSolver(Minimizer):
    """Base of Gauss-Newton and Levenberg-Marquardt: the gradient ``g = Jᵀr`` and the
    decrease of ``½‖r‖²`` computed as ``½ (r − r')·(r + r')``, free of the cancellation of a
    difference of two sums of squares (so steps are judged accurately even when ``‖r‖`` is
    large and the change tiny). ``slack`` is a few rounding errors of ``½‖r‖²``.

    >>> import torch, implicit_layers as il
    >>> isinstance(il.GaussNewton(), LeastSquaresSolver)
    True
    """

    def start(self, problem: RootProblem, y0: Tensor):
        """``(residuals, y, r, J, g, log)`` at the initial guess (``y`` flattened)."""
        res = Residuals(problem, y0, self.name)
        y = res.flat(y0)
        r, J = res.linearize(y)
        g = self.gradient(r, J)
        return res, y, r, J, g, GradientLog(self, problem, res.unflat(g))

    def finish(self, res: Residuals, y: Tensor, r: Tensor, J: Tensor, log: GradientLog,
               **extra) -> SolveResult:
        """The result, with ``J`` and ``r`` at the solution in ``aux`` for the adjoint."""
        shape = log.res.shape
        stats = log.stats(**{k: v.reshape(shape) for k, v in extra.items()})
        stats.evaluations = res.evaluations
        aux = NormalEquations(J.reshape(*res.batch_shape, *J.shape[-2:]),
                              r.reshape(*res.batch_shape, r.shape[-1]))
        return SolveResult(res.unflat(y), stats, aux=aux)

    @staticmethod
    def gradient(r: Tensor, J: Tensor) -> Tensor:
        return (r.unsqueeze(-2) @ J).squeeze(-2)

    @staticmethod
    def decrease(r: Tensor, r_new: Tensor) -> Tensor:
        return 0.5 * ((r - r_new) * (r + r_new)).sum(-1)

    @staticmethod
    def slack(r: Tensor) -> Tensor:
        return 16 * torch.finfo(r.dtype).eps * r.square().sum(-1)
