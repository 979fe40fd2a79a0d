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

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor, nn

from implicit_layers.errors import SingularSystemError
from implicit_layers.linalg.base import Factorization
from implicit_layers.linalg.dense import Cholesky
from implicit_layers.solvers.base import RootProblem
from implicit_layers.solvers.minimize.base import Minimizer

_ASKED: ContextVar[list | None] = ContextVar("least_squares_residual_vectors", default=None)

RANK_DEFICIENT = ("the residual's Jacobian ∂r/∂y is rank deficient, so the least-squares "
                  "minimizer is not unique (remove redundant parameters or add a regularizing "
                  "residual)")


@contextmanager
def single_threaded(device: torch.device):
    """Run the tiny ``n × n`` factorizations of each iteration on one CPU thread: with two
    threads on a busy 2-core machine MKL spent ~17 ms per 2 × 2 batched Cholesky (measured
    here), 1000× the work (see also the Anderson solver)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def residual_vectors():
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

    def forward(self, x, y: Tensor) -> Tensor:
        r = self.residual(x, y)
        batch = y.shape[: y.ndim - self.event_ndim]
        if r.shape[: len(batch)] != batch:
            raise ValueError(f"residual must keep y's batch dims {tuple(batch)} in front; "
                             f"got shape {tuple(r.shape)}")
        answered = _ASKED.get()
        if answered is not None:
            answered.append(True)
            return r
        return 0.5 * r.reshape(*batch, -1).square().sum(-1)


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


class Residuals:
    """``r`` and its Jacobian on iterates flattened to ``(B, n)``, with ``r`` as ``(B, m)``."""

    def __init__(self, problem: RootProblem, y0: Tensor, solver: str):
        if problem.objective is None:
            raise ValueError(f"{solver} needs a least-squares problem (il.LeastSquaresLayer)")
        self.problem, self.shape, self.solver = problem, y0.shape, solver
        self.batch_shape = problem.batch_shape(y0)
        self.B = self.batch_shape.numel()
        self.n = y0.shape[len(self.batch_shape):].numel()
        self.evaluations = 0

    def flat(self, y: Tensor) -> Tensor:
        return y.reshape(self.B, self.n)

    def unflat(self, y: Tensor) -> Tensor:
        return y.reshape(self.shape)

    def _r(self, y: Tensor) -> Tensor:
        with residual_vectors() as answered:
            r = self.problem.objective(self.unflat(y))
        if not answered:
            raise ValueError(f"{self.solver} needs a least-squares problem: its objective must "
                             "be a SumOfSquares (use il.LeastSquaresLayer)")
        return r.reshape(self.B, -1)

    def residual(self, y: Tensor) -> Tensor:
        """``r`` (B, m) at ``y`` (B, n)."""
        self.evaluations += 1
        return self._r(y)

    def linearize(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(r (B, m), J (B, m, n))`` at ``y``: ``n`` batched JVPs, or ``m`` batched VJPs
        inside a classic forward-AD level (where ``torch.func.jvp`` is refused)."""
        self.evaluations += 1
        eye = torch.eye(self.n, dtype=y.dtype, device=y.device)
        if forward_ad._current_level < 0:
            basis = eye[:, None, :].expand(self.n, self.B, self.n)
            r, cols = torch.func.vmap(lambda t: torch.func.jvp(self._r, (y,), (t,)),
                                      out_dims=(None, 0))(basis)
            return r, cols.permute(1, 2, 0)
        r, vjp = torch.func.vjp(self._r, y)
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

    @staticmethod
    def gradient(r: Tensor, J: Tensor) -> Tensor:
        return (r.unsqueeze(-2) @ J).squeeze(-2)

    @staticmethod
    def decrease(r: Tensor, r_new: Tensor) -> Tensor:
        return 0.5 * ((r - r_new) * (r + r_new)).sum(-1)

    @staticmethod
    def slack(r: Tensor) -> Tensor:
        return 16 * torch.finfo(r.dtype).eps * r.square().sum(-1)
