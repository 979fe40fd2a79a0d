"""Learn a state-feedback gain by gradient descent through a Lyapunov layer (policy-gradient LQR).

For ``ẋ = A x + B u`` with ``u = −K x``, the cost ``E ∫ (xᵀQx + uᵀRu) dt`` from ``x₀ ~ (0, Σ₀)``
is ``J(K) = tr(P_K Σ₀)``, where ``P_K`` solves the closed-loop Lyapunov equation

    (A − BK)ᵀ P + P (A − BK) + Q + Kᵀ R K = 0,

i.e. ``il.LyapunovLayer()(A_cl, Q_cl)`` with ``A_cl = (A − BK)ᵀ``, ``Q_cl = Q + KᵀRK`` in the
layer's convention ``A P + P Aᵀ + Q = 0``. The optimum is the Riccati gain
``K* = R⁻¹ Bᵀ X`` from ``scipy.linalg.solve_continuous_are``, used only for evaluation.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla
import torch
from torch import Tensor, nn

import implicit_layers as il
from experiments.tasks.data import WholeDataModule
from experiments.tasks.module import TaskModule


def lqr_cost(K: np.ndarray, A, B, Q, R, Sigma0) -> float:
    """``tr(P Σ₀)`` by SciPy (``inf`` when ``A − BK`` is not Hurwitz): the independent check."""
    A_cl = A - B @ K
    if np.linalg.eigvals(A_cl).real.max() >= 0:
        return float("inf")
    P = sla.solve_continuous_lyapunov(A_cl.T, -(Q + K.T @ R @ K))
    return float(np.trace(P @ Sigma0))


class LQRSystemDataModule(WholeDataModule):
    """A random linear system with some unstable modes, its costs, and the reference solution.

    Every "batch" is the system itself (a dict of float64 tensors); ``steps_per_epoch`` sets how
    many optimizer steps an epoch has (under DDP, shared among the ranks). The validation and
    test "split" is the one system: under DDP every rank evaluates it, and since its metrics
    depend only on the gain, which is the same on every rank, their mean is that value.

    Args:
        n, m: state and input dimensions.
        instability: shift added to ``A``'s diagonal (positive: open loop unstable).
        init_r_scale: the starting gain is the Riccati gain for ``R · init_r_scale``
            (stabilizing, suboptimal for ``R``).
        steps_per_epoch, seed: see above.
    """

    def __init__(self, n: int = 6, m: int = 2, instability: float = 0.3, init_r_scale: float = 30.0,
                 steps_per_epoch: int = 10, seed: int = 0):
        super().__init__(steps_per_epoch)
        self.n, self.m, self.instability, self.init_r_scale = n, m, instability, init_r_scale
        self.seed = seed
        self.system: dict[str, np.ndarray] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.system is not None:
            return
        rng = np.random.default_rng(self.seed)
        n, m = self.n, self.m
        A = rng.standard_normal((n, n)) / np.sqrt(n) + self.instability * np.eye(n)
        B = rng.standard_normal((n, m))
        L = rng.standard_normal((n, n)) / np.sqrt(n)
        Q, R, Sigma0 = L @ L.T + 0.1 * np.eye(n), np.eye(m), np.eye(n)
        X = sla.solve_continuous_are(A, B, Q, R)
        X0 = sla.solve_continuous_are(A, B, Q, R * self.init_r_scale)
        self.system = {"A": A, "B": B, "Q": Q, "R": R, "Sigma0": Sigma0}
        self.K_star = np.linalg.solve(R, B.T @ X)
        self.K_init = np.linalg.solve(R * self.init_r_scale, B.T @ X0)
        self.J_star = lqr_cost(self.K_star, **self.system)

    def whole_batch(self) -> dict[str, Tensor]:
        return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in self.system.items()}


class LQRGain(TaskModule):
    """The gain ``K`` as a parameter, trained on ``J(K) = tr(P_K Σ₀)`` through ``il.LyapunovLayer``.

    Args:
        n, m: state and input dimensions (the gain is ``m × n``).
        optimizer, scheduler, interval: see :class:`~experiments.tasks.module.TaskModule`.
    """

    def __init__(self, optimizer, n: int, m: int, scheduler=None, interval: str = "epoch"):
        super().__init__(optimizer, scheduler, interval)
        self.K = nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
        self.lyapunov = il.LyapunovLayer()

    def setup(self, stage: str) -> None:
        # the datamodule's stabilizing start; a resumed run then loads K from its checkpoint
        if stage == "fit" and not bool(self.K.any()):
            with torch.no_grad():
                self.K.copy_(torch.as_tensor(self.trainer.datamodule.K_init))

    def cost(self, system: dict[str, Tensor]) -> Tensor:
        A, B, Q, R, Sigma0 = (system[k].to(self.K) for k in ("A", "B", "Q", "R", "Sigma0"))
        A_cl = A - B @ self.K
        if bool(torch.linalg.eigvals(A_cl.detach()).real.max() >= 0):
            raise FloatingPointError("the gain left the stabilizing set: J(K) is infinite; "
                                     "lower the learning rate")
        P = self.lyapunov(A_cl.mT, Q + self.K.mT @ R @ self.K)
        return torch.trace(P @ Sigma0)

    def _errors(self, J: float) -> dict[str, float]:
        data = self.trainer.datamodule
        K_star = torch.as_tensor(data.K_star, dtype=torch.float64)
        K = self.K.detach().cpu()
        return {"gain_rel_error": float(torch.linalg.norm(K - K_star) / torch.linalg.norm(K_star)),
                "cost_rel_gap": J / data.J_star - 1}

    def training_step(self, system, _idx):
        J = self.cost(system)
        errors = self._errors(float(J.detach()))
        self.log_dict({"train_loss": J, **errors}, prog_bar=True, batch_size=1)
        return J

    def validation_step(self, system, _idx):
        J = self.cost(system)
        errors = {f"val_{k}": v for k, v in self._errors(float(J.detach())).items()}
        self.log_dict({"val_loss": J, **errors}, batch_size=1)

    def test_step(self, system, _idx):
        # independent check: the cost of the learned gain by SciPy, not by the layer
        data = self.trainer.datamodule
        J = lqr_cost(self.K.detach().cpu().numpy(), **data.system)
        self.log_dict({"test_loss": J, "optimal_cost": data.J_star, **self._errors(J)}, batch_size=1)
