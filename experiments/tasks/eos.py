"""Fit the van der Waals equation of state to noisy (P, T, V) data, V from a root-finding layer.

Per mole, ``(P + a / V²)(V − b) = R T``. Above the critical temperature ``T_c = 8a / (27 R b)``
the pressure decreases monotonically in ``V > b``, so each (P, T) has one molar volume: the
layer solves the dimensionless residual ``(P + a/V²)(V − b) / (R T) − 1 = 0`` with Newton's
method from ``R T / P + b`` (the root for ``a = 0``), and the implicit function theorem gives the
gradients with respect to ``a`` and ``b``. Units: bar, L/mol, K.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor, nn

import implicit_layers as il
from experiments.tasks.data import TensorDataModule, split_indices
from experiments.tasks.module import TaskModule

R = 0.083144626  # L bar / (mol K)


def vdw_volume(P: float, T: float, a: float, b: float) -> float:
    """The molar volume above ``b`` (the unique one when ``T > T_c``), by bracketing."""
    f = lambda V: (P + a / V**2) * (V - b) - R * T  # noqa: E731
    hi = R * T / P + b
    while f(hi) < 0:
        hi *= 2
    return brentq(f, b * (1 + 1e-12), hi, xtol=1e-15, rtol=1e-14)


class VdWDataModule(TensorDataModule):
    """Noisy van der Waals volumes at random supercritical (P, T).

    Args:
        a, b: the true parameters (default: CO₂, T_c ≈ 304 K).
        n: number of observations; ``val_frac``/``test_frac`` of them are held out.
        T_range: temperatures, all above ``T_c``; P_range: pressures (bar).
        noise: relative Gaussian noise on the observed volume.
    """

    def __init__(self, a: float = 3.640, b: float = 0.04267, n: int = 800,
                 T_range: tuple[float, float] = (320.0, 600.0),
                 P_range: tuple[float, float] = (5.0, 300.0), noise: float = 0.01,
                 val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0,
                 batch_size: int | None = None):
        super().__init__(batch_size=batch_size, seed=seed)
        self.a, self.b, self.n, self.noise = a, b, n, noise
        self.T_range, self.P_range, self.fractions = tuple(T_range), tuple(P_range), (val_frac, test_frac)
        self.T_c = 8 * a / (27 * R * b)
        if self.T_range[0] <= self.T_c:
            raise ValueError(f"T_range must lie above T_c = {self.T_c:.1f} K (unique root), "
                             f"got {self.T_range}")

    def make_splits(self):
        rng = np.random.default_rng(self.seed)
        T = rng.uniform(*self.T_range, self.n)
        P = np.exp(rng.uniform(math.log(self.P_range[0]), math.log(self.P_range[1]), self.n))
        V = np.array([vdw_volume(p, t, self.a, self.b) for p, t in zip(P, T)])
        V_obs = V * (1 + self.noise * rng.standard_normal(self.n))
        data = [torch.as_tensor(v, dtype=torch.float64) for v in (P, T, V_obs)]
        return tuple(tuple(d[idx] for d in data)
                     for idx in split_indices(self.n, self.fractions, self.seed))


class VanDerWaals(nn.Module):
    """The residual ``(P + a/V²)(V − b) / (R T) − 1``, parametrized by ``a`` and the critical
    temperature ``T_c = 8a / (27 R b) = T_bound · sigmoid(θ)``.

    Keeping ``T_c`` below ``T_bound`` (the lowest temperature of the data) keeps every
    observation supercritical for every parameter value the optimizer visits, so ``V(P, T)``
    stays a function with one root. Plain ``(log a, log b)`` lets a fast optimizer wander into
    subcritical ``(a, b)``, where the volume has up to three roots and Newton can stall.
    """

    def __init__(self, a: float, b: float, T_bound: float):
        super().__init__()
        T_c = 8 * a / (27 * R * b)
        if not 0 < T_c < T_bound:
            raise ValueError(f"initial (a, b) must have T_c = {T_c:.1f} K below T_bound = {T_bound}")
        self.T_bound = T_bound
        self.log_a = nn.Parameter(torch.tensor(math.log(a), dtype=torch.float64))
        self.theta = nn.Parameter(torch.tensor(math.log(T_c / (T_bound - T_c)), dtype=torch.float64))

    def params(self) -> tuple[Tensor, Tensor]:
        a = self.log_a.exp()
        return a, 8 * a / (27 * R * self.T_bound * torch.sigmoid(self.theta))

    def forward(self, x: tuple[Tensor, Tensor], V: Tensor) -> Tensor:
        P, T = x
        a, b = self.params()
        return (P + a / V**2) * (V - b) / (R * T) - 1


class EOSFit(TaskModule):
    """Least squares on the relative volume error, ``V(P, T; a, b)`` from ``il.RootFindLayer``.

    Args:
        T_bound: upper bound on the critical temperature (the data's lowest temperature).
        a_init, b_init: starting parameters.
        solver: the root solver (default ``il.Newton(tol=1e-12)``).
        optimizer, scheduler, interval: see :class:`~experiments.tasks.module.TaskModule`.
    """

    def __init__(self, optimizer, T_bound: float, a_init: float = 1.0, b_init: float = 0.06,
                 solver=None, scheduler=None, interval: str = "epoch"):
        super().__init__(optimizer, scheduler, interval)
        self.eos = VanDerWaals(a_init, b_init, T_bound)
        self.volume = il.RootFindLayer(self.eos, solver or il.Newton(tol=1e-12), event_ndim=0)

    def forward(self, P: Tensor, T: Tensor) -> Tensor:
        b = self.eos.params()[1].detach()
        return self.volume((P, T), R * T / P + b)  # the exact root when a = 0

    def _loss(self, batch) -> Tensor:
        P, T, V_obs = batch
        return ((self(P, T) / V_obs - 1) ** 2).mean()

    def training_step(self, batch, _idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, _idx):
        self.log("val_loss", self._loss(batch), prog_bar=True)

    def test_step(self, batch, _idx):
        self.log("test_loss", self._loss(batch))
        truth = self.trainer.datamodule
        a, b = (float(p) for p in self.eos.params())
        errors = {"a_rel_error": abs(a / truth.a - 1), "b_rel_error": abs(b / truth.b - 1)}
        self.log_dict({**errors, "param_rel_error": max(errors.values()), "a": a, "b": b})
