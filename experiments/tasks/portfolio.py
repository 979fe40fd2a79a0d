"""Decision-focused learning through an equality-constrained QP (a budget-constrained portfolio).

From features ``φ`` a linear model predicts returns ``μ̂``; the decision is the mean-variance
portfolio ``x(μ̂) = argmin ½ γ xᵀΣx − μ̂ᵀx  s.t.  1ᵀx = 1``, computed by ``il.EqualityQPLayer``
(``Q = γΣ, c = −μ̂, A = 1ᵀ, b = 1``). Training minimizes the decision's true cost
``f(x; μ) = ½ γ xᵀΣx − μᵀx`` under the realized returns ``μ``. The two-stage baseline fits the
same linear model to ``μ`` by least squares and then optimizes. Both are scored by the
normalized regret ``Σᵢ [f(x(μ̂ᵢ); μᵢ) − f(x(μᵢ); μᵢ)] / Σᵢ |f(x(μᵢ); μᵢ)|``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import implicit_layers as il
from experiments.tasks.data import TensorDataModule, split_indices
from experiments.tasks.module import TaskModule


def make_market(n_assets: int, seed: int, gamma: float) -> tuple[Tensor, Tensor]:
    """A random covariance ``Σ`` (factor model plus idiosyncratic noise) and ``Q = γΣ``."""
    gen = torch.Generator().manual_seed(seed + 1)
    F = torch.randn(n_assets, 3, generator=gen, dtype=torch.float64) * 0.1
    Sigma = F @ F.T + torch.diag(0.01 + 0.02 * torch.rand(n_assets, generator=gen, dtype=torch.float64))
    return Sigma, gamma * Sigma


class PortfolioDataModule(TensorDataModule):
    """Features ``φ ~ N(0, I)`` and returns ``μ = μ₀ + s · h(Wφ / √p) + σ ε``.

    ``degree = 1`` (``h`` the identity) is the well-specified case for a linear predictor;
    ``degree > 1`` uses ``h(t) = ((1 + t)^degree − 1) / degree``, a misspecified case (with
    this affine decision map, both methods then lose about equally: 0.40 regret at degree 3).

    Args:
        n_assets, n_features, n: sizes; val_frac, test_frac: held-out fractions.
        signal, noise: scales ``s`` and ``σ``; mean_return: ``μ₀``; degree: see above.
        gamma: risk aversion; batch_size, seed: as usual.
    """

    def __init__(self, n_assets: int = 10, n_features: int = 5, n: int = 2000, signal: float = 0.1,
                 noise: float = 0.005, mean_return: float = 0.05, degree: int = 1,
                 gamma: float = 2.0, val_frac: float = 0.1, test_frac: float = 0.2,
                 batch_size: int = 64, seed: int = 0):
        super().__init__(batch_size=batch_size, seed=seed)
        if degree < 1:
            raise ValueError(f"degree must be >= 1, got {degree}")
        self.n_assets, self.n_features, self.n = n_assets, n_features, n
        self.signal, self.noise, self.mean_return, self.degree = signal, noise, mean_return, degree
        self.fractions = (val_frac, test_frac)
        self.Sigma, self.Q = make_market(n_assets, seed, gamma)

    def make_splits(self):
        gen = torch.Generator().manual_seed(self.seed)
        p = self.n_features
        W = torch.randn(self.n_assets, p, generator=gen, dtype=torch.float64)
        phi = torch.randn(self.n, p, generator=gen, dtype=torch.float64)
        t = phi @ W.T / math.sqrt(p)
        h = t if self.degree == 1 else ((1 + t) ** self.degree - 1) / self.degree
        mu = self.mean_return + self.signal * h
        mu = mu + self.noise * torch.randn(mu.shape, generator=gen, dtype=torch.float64)
        return tuple((phi[idx], mu[idx]) for idx in split_indices(self.n, self.fractions, self.seed))


class DecisionFocusedPortfolio(TaskModule):
    """A linear return predictor trained end to end through ``il.EqualityQPLayer``.

    Args:
        n_features, n_assets: the predictor's input and output sizes.
        optimizer, scheduler, interval: see :class:`~experiments.tasks.module.TaskModule`.
    """

    def __init__(self, optimizer, n_features: int, n_assets: int, scheduler=None,
                 interval: str = "epoch"):
        super().__init__(optimizer, scheduler, interval)
        self.predict = nn.Linear(n_features, n_assets, dtype=torch.float64)
        self.qp = il.EqualityQPLayer()

    def decide(self, mu_hat: Tensor) -> Tensor:
        """The portfolio ``x(μ̂)`` for each row of ``μ̂``."""
        Q = self.trainer.datamodule.Q.to(mu_hat)
        n = mu_hat.shape[-1]
        A, b = torch.ones(1, n).to(mu_hat), torch.ones(1).to(mu_hat)
        x, _lam = self.qp(Q.expand(*mu_hat.shape[:-1], n, n), -mu_hat,
                          A.expand(*mu_hat.shape[:-1], 1, n), b.expand(*mu_hat.shape[:-1], 1))
        return x

    def true_cost(self, x: Tensor, mu: Tensor) -> Tensor:
        Q = self.trainer.datamodule.Q.to(x)
        return 0.5 * torch.einsum("bi,ij,bj->b", x, Q, x) - (mu * x).sum(-1)

    def regret(self, mu_hat: Tensor, mu: Tensor, split: str) -> Tensor:
        """This batch's share of the split's normalized regret: ``Σ_batch [f(x(μ̂); μ) −
        f(x(μ); μ)]`` over ``Σ_split |f(x(μ); μ)|``. Logged with ``reduce_fx="sum"``, the shares
        add up to the split's regret however the split is batched or sharded across ranks."""
        best = self.true_cost(self.decide(mu), mu)
        return (self.true_cost(self.decide(mu_hat), mu) - best).sum() / self._regret_scale(split)

    def _regret_scale(self, split: str) -> Tensor:
        """``Σ |f(x(μ); μ)|`` over the whole split (every rank holds all of it)."""
        mu = self.trainer.datamodule.splits[split].tensors[1].to(self.device)
        return self.true_cost(self.decide(mu), mu).abs().sum()

    def training_step(self, batch, _idx):
        phi, mu = batch
        loss = self.true_cost(self.decide(self.predict(phi)), mu).mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, _idx):
        phi, mu = batch
        self.log("val_loss", self.true_cost(self.decide(self.predict(phi)), mu).mean(), prog_bar=True)
        self.log("val_regret", self.regret(self.predict(phi), mu, "val"), prog_bar=True, reduce_fx="sum")

    def test_step(self, batch, _idx):
        phi, mu = batch
        # two-stage baseline on the same training data: least squares for μ, then optimize
        phi_tr, mu_tr = self.trainer.datamodule.splits["train"].tensors
        design = torch.cat([phi_tr, torch.ones(len(phi_tr), 1, dtype=phi_tr.dtype)], dim=1)
        coef = torch.linalg.lstsq(design.to(mu), mu_tr.to(mu)).solution
        mu_two_stage = torch.cat([phi, torch.ones(len(phi), 1).to(phi)], dim=1) @ coef
        mse = lambda pred: ((pred - mu) ** 2).mean()  # noqa: E731
        self.log_dict({"test_regret": self.regret(self.predict(phi), mu, "test"),
                       "two_stage_regret": self.regret(mu_two_stage, mu, "test")}, reduce_fx="sum")
        self.log_dict({"test_mse": mse(self.predict(phi)), "two_stage_mse": mse(mu_two_stage)})
