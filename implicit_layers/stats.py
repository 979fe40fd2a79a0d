"""Solver statistics and the failure policy.

Every solve (forward, adjoint, tangent) returns a :class:`SolverStats`. The failure policy
turns a non-converged solve into a :class:`ConvergenceError` (``on_failure="raise"``) or a
:class:`ConvergenceWarning` (``on_failure="warn"``); it is never silent.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from implicit_layers.errors import ConvergenceError, ConvergenceWarning


@dataclass
class SolverStats:
    """What one solve did, per sample of the batch.

    >>> import torch, implicit_layers as il
    >>> layer = il.RootFindLayer(lambda x, y: y ** 2 - x, event_ndim=0)  # 2nd: line search hits 3
    >>> _ = layer(torch.tensor([4.0, 9.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    >>> st = layer.stats.forward
    >>> st.converged.tolist(), st.iterations.tolist()
    ([True, True], [5, 1])

    Attributes:
        solver: name of the solver that ran.
        iterations: iterations each sample needed (shape = batch shape, int64).
        residual: final residual norm of each sample.
        converged: boolean mask, True where the sample met its tolerance.
        trace: residual norms after each iteration, shape (iterations, *batch), if recorded.
        evaluations: number of calls of the residual (batched calls count once).
    """

    solver: str
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    trace: Tensor | None = None
    evaluations: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def summary(self) -> dict[str, float]:
        """Plain floats for loggers: max/mean iterations, max residual, converged fraction."""
        it = self.iterations.double()
        return {
            "iterations_max": float(it.max()) if it.numel() else 0.0,
            "iterations_mean": float(it.mean()) if it.numel() else 0.0,
            "residual_max": float(self.residual.max()) if self.residual.numel() else 0.0,
            "frac_converged": float(self.converged.double().mean()) if it.numel() else 1.0,
            "evaluations": float(self.evaluations),
        }

    def __repr__(self) -> str:  # short: batches can be large
        s = self.summary()
        return (
            f"SolverStats({self.solver}: iters max {s['iterations_max']:.0f}, "
            f"residual max {s['residual_max']:.3g}, converged {s['frac_converged']:.0%})"
        )

    @classmethod
    def exact(cls, solver: str, batch_shape, residual: Tensor | None = None, device=None):
        """Stats of a direct (non-iterative) solve: one step, converged everywhere."""
        shape = tuple(batch_shape)
        res = residual if residual is not None else torch.zeros(shape, device=device)
        return cls(
            solver=solver,
            iterations=torch.ones(shape, dtype=torch.int64, device=res.device),
            residual=res,
            converged=torch.ones(shape, dtype=torch.bool, device=res.device),
            evaluations=1,
        )


@dataclass
class LayerStats:
    """The stats of a layer's most recent forward, backward and tangent (JVP) solves.

    >>> import torch, implicit_layers as il
    >>> layer = il.RootFindLayer(lambda x, y: y ** 3 - x, event_ndim=0)
    >>> x = torch.tensor([8.0], dtype=torch.float64, requires_grad=True)
    >>> layer(x, torch.ones(1, dtype=torch.float64)).sum().backward()
    >>> sorted(k for k in layer.stats.summary() if k.endswith("frac_converged"))
    ['backward/frac_converged', 'forward/frac_converged']"""

    forward: SolverStats | None = None
    backward: SolverStats | None = None
    tangent: SolverStats | None = None

    def summary(self) -> dict[str, float]:
        out = {}
        for phase in ("forward", "backward", "tangent"):
            st = getattr(self, phase)
            if st is not None:
                out.update({f"{phase}/{k}": v for k, v in st.summary().items()})
        return out


def enforce(stats: SolverStats, on_failure: str, what: str) -> SolverStats:
    """Apply the failure policy to a finished solve and return its stats.

    A solver that knows why its samples failed (a QP's infeasible constraints, say) puts the
    explanation and advice in ``stats.extra["failure"]``; it replaces the generic advice."""
    if stats.all_converged:
        return stats
    failed = int((~stats.converged).sum())
    total = stats.converged.numel()
    advice = stats.extra.get("failure") or (
        f"(solver {stats.solver}, max residual {float(stats.residual.max()):.3e}, "
        f"max iterations {int(stats.iterations.max())}); raise max_iter, loosen tol, "
        f"or pass on_failure='warn' to continue with the unconverged point")
    msg = f"{what} did not converge for {failed} of {total} samples {advice}"
    if on_failure == "warn":
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        return stats
    raise ConvergenceError(msg, stats)


def check_finite_iterate(value: Tensor, solver: str, iteration: int, what: str = "iterate"):
    """Stop a solve whose iterate became NaN/Inf, naming where it happened."""
    if not bool(torch.isfinite(value).all()):
        raise ConvergenceError(
            f"{solver}: non-finite {what} at iteration {iteration}; the solve was stopped "
            f"instead of propagating NaN/Inf (check the residual's scale or damping)"
        )
