"""Intermediate states of a fixed-point solve, for fixed-point correction.

Fixed-point correction (Bai et al., "Deep Equilibrium Optical Flow Estimation", 2022) trains
on several states ``z_1, …, z_k = z*`` along the solver's trajectory, with the loss
``Σ_i γ^(k−i) ℓ(z_i)``; each state is differentiated as if it were the equilibrium, with the
implicit gradient at its own point (or an approximation of it such as the phantom gradient):

    x̄ = (∂cell/∂x)ᵀ u,   u = J_iᵀ u + z̄_i,   J_i = ∂cell/∂z at (x, z_i)

Two pieces make this a use of the generic layer rather than a new autograd function:

* :class:`Recording` wraps the forward solver and keeps iterates through the solver's
  observer hook (:class:`~implicit_layers.solvers.base.RootProblem` ``observer``); at most
  ``2k`` of them are held at any time (every ``s``-th iterate, ``s`` doubling as the solve
  runs long), and :meth:`TrajectoryRecorder.pick` returns the ``k − 1`` kept iterates nearest
  to the iterations ``i·K/k`` of a solve of ``K`` iterations;
* :class:`GivenPoint` is a "solver" that returns its starting point, so that passing a
  recorded state through the generic layer attaches the implicit gradient at that state.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from implicit_layers.solvers.base import RootProblem, RootSolver, SolveResult
from implicit_layers.stats import SolverStats


class TrajectoryRecorder:
    """Keeps every ``stride``-th iterate of a solve, at most ``2k`` of them (the stride
    doubles when they would be more), starting with the initial guess (iteration 0).

    >>> import torch
    >>> rec = TrajectoryRecorder(k=3)
    >>> for it in range(13):
    ...     rec(it, torch.tensor(float(it)))
    >>> [it for it, _ in rec.kept], rec.pick(12)[0]
    ([0, 4, 8, 12], [4, 8])
    """

    def __init__(self, k: int):
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"trajectory must be a positive integer, got {k!r}")
        self.k, self.stride = int(k), 1
        self.kept: list[tuple[int, Tensor]] = []

    def __call__(self, iteration: int, y: Tensor) -> None:
        if iteration % self.stride:
            return
        self.kept.append((iteration, y))
        if len(self.kept) > 2 * self.k:
            self.kept = [(it, t) for it, t in self.kept if it % (2 * self.stride) == 0]
            self.stride *= 2

    def pick(self, last: int) -> tuple[list[int], list[Tensor]]:
        """The iterations and states of the ``k − 1`` kept iterates nearest to ``i·last/k``,
        ``i = 1 … k − 1`` (repeats are possible when the solve took fewer than ``k`` steps)."""
        iterations, states = [], []
        for i in range(1, self.k):
            target = i * last / self.k
            it, state = min(self.kept, key=lambda kept: (abs(kept[0] - target), kept[0]))
            iterations.append(it)
            states.append(state)
        return iterations, states


class Recording(RootSolver):
    """Runs ``solver`` with ``recorder`` observing its iterates (and the initial guess)."""

    def __init__(self, solver: RootSolver, recorder: TrajectoryRecorder):
        self.solver, self.recorder = solver, recorder
        self.name = solver.name

    def solve(self, problem: RootProblem, y0: Tensor) -> SolveResult:
        self.recorder(0, y0)
        return self.solver.solve(dataclasses.replace(problem, observer=self.recorder), y0)

    def __repr__(self) -> str:
        return f"Recording({self.solver!r})"


class GivenPoint(RootSolver):
    """A "solve" that returns ``y0`` unchanged: the generic layer then attaches the implicit
    gradient (or the adjoint's approximation of it) at ``y0``. Its stats mark the point as
    accepted by construction (``extra["given_point"] = True``); the residual there is not
    evaluated (reported as NaN)."""

    name = "given point"

    def __init__(self):
        super().__init__(max_iter=0)

    def solve(self, problem: RootProblem, y0: Tensor) -> SolveResult:
        batch = problem.batch_shape(y0)
        stats = SolverStats(
            solver=self.name,
            iterations=torch.zeros(batch, dtype=torch.int64, device=y0.device),
            residual=torch.full(batch, float("nan"), dtype=y0.dtype, device=y0.device),
            converged=torch.ones(batch, dtype=torch.bool, device=y0.device),
            evaluations=0,
            extra={"given_point": True},
        )
        return SolveResult(y0, stats)
