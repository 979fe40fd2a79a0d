"""Learn one L2 penalty per feature of a ridge model by gradient descent through an argmin.

The inner problem is ridge regression with per-feature penalties ``exp(θ_j)`` and an
unpenalized intercept,

    w*(θ) = argmin_{w, b}  (1/|T|) Σ_{i∈T} (x_iᵀw + b − t_i)² + Σ_j exp(θ_j) w_j²,

solved by ``il.ArgminLayer`` (Newton-CG) for the K training folds of a K-fold split at once (a
batch of K problems, the folds given as 0/1 weights on the same rows). The outer objective is
the mean held-out squared error over the folds (the cross-validation loss, the "validation
loss" of the hyperparameters) plus ``ρ · var(θ)``, a small pull of the penalties towards their
common value against overfitting ~50 hyperparameters to ~300 rows; its gradient in ``θ``
comes from the implicit function theorem. With the learned penalties the model is refit on
all training rows and scored on the test rows.

The baseline, in the same run and on the same rows, is scikit-learn's ``RidgeCV``: one
penalty chosen by (efficient leave-one-out) cross-validation on the training rows, refit on
them. Data: ``load_diabetes`` (442 × 10, shipped with scikit-learn) plus Gaussian noise
features that a single penalty cannot switch off without shrinking the real ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import RidgeCV
from torch import Tensor, nn

import implicit_layers as il
from experiments.tasks.data import WholeDataModule
from experiments.tasks.module import TaskModule


class DiabetesNoiseDataModule(WholeDataModule):
    """``load_diabetes`` with ``n_noise`` standard-normal features appended, standardized with
    the training rows' statistics (target too), a seeded train/test split and K fold masks.

    Every batch is the whole data set as a dict of float64 tensors: ``X``, ``t`` (training
    rows), ``folds`` (K × rows, 1 where a row trains fold k), ``X_test``, ``t_test``;
    ``steps_per_epoch`` sets how many optimizer steps an epoch has.

    Args:
        n_noise: noise features added to the 10 real ones.
        test_frac: fraction of the 442 rows held out for testing.
        folds: K of the K-fold split of the training rows.
        steps_per_epoch, seed: see above.
    """

    def __init__(self, n_noise: int = 40, test_frac: float = 1 / 3, folds: int = 5,
                 steps_per_epoch: int = 10, seed: int = 0):
        super().__init__(steps_per_epoch)
        if folds < 2:
            raise ValueError(f"folds must be >= 2, got {folds}")
        self.n_noise, self.test_frac, self.folds, self.seed = n_noise, test_frac, folds, seed
        self.data: dict[str, Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        X, t = load_diabetes(return_X_y=True)
        rng = np.random.default_rng(self.seed)
        X = np.hstack([X, rng.standard_normal((len(t), self.n_noise))])
        perm = rng.permutation(len(t))
        n_test = round(self.test_frac * len(t))
        train, test = perm[n_test:], perm[:n_test]
        X = (X - X[train].mean(0)) / X[train].std(0)
        t = (t - t[train].mean()) / t[train].std()
        fold = rng.permutation(len(train)) % self.folds
        masks = fold[None, :] != np.arange(self.folds)[:, None]
        self.data = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in {
            "X": X[train], "t": t[train], "folds": masks, "X_test": X[test], "t_test": t[test]}.items()}

    def whole_batch(self) -> dict[str, Tensor]:
        return self.data


def ridge_objective(x: tuple[Tensor, ...], wb: Tensor) -> Tensor:
    """Weighted mean squared error plus ``Σ exp(θ_j) w_j²`` per problem; ``wb = (w, b)``."""
    X, t, weights, log_penalty = x
    w, b = wb[..., :-1], wb[..., -1:]
    sq = (w @ X.mT + b - t).square()
    return (weights * sq).sum(-1) / weights.sum(-1) + (log_penalty.exp() * w.square()).sum(-1)


class PenaltyLearner(TaskModule):
    """The per-feature log-penalties ``θ`` as parameters, trained on the cross-validation loss
    through ``il.ArgminLayer``.

    Args:
        n_real, n_noise: real and noise features of the data (in that order).
        init_penalty: the starting penalty of every feature.
        spread_weight: ``ρ``, the weight of ``var(θ)`` in the outer objective.
        solver: the inner minimizer (default ``il.NewtonCG()``).
        optimizer, scheduler, interval: see :class:`~experiments.tasks.module.TaskModule`.
    """

    def __init__(self, optimizer, n_noise: int, n_real: int = 10, init_penalty: float = 0.1,
                 spread_weight: float = 0.01, solver=None, scheduler=None, interval: str = "epoch"):
        super().__init__(optimizer, scheduler, interval)
        self.n_real = n_real
        self.log_penalty = nn.Parameter(torch.full((n_real + n_noise,), math.log(init_penalty),
                                                   dtype=torch.float64))
        self.spread_weight = spread_weight
        self.ridge = il.ArgminLayer(ridge_objective, solver or il.NewtonCG())
        # the folds' last solutions: warm starts (they change iteration counts, not results)
        self.register_buffer("warm", torch.zeros(0, dtype=torch.float64), persistent=False)

    def fit(self, X: Tensor, t: Tensor, weights: Tensor, warm: Tensor | None = None) -> Tensor:
        """``(w, b)`` of the ridge problems weighted by ``weights`` (one problem per row)."""
        if warm is None or warm.shape != (*weights.shape[:-1], X.shape[-1] + 1):
            warm = torch.zeros(*weights.shape[:-1], X.shape[-1] + 1, dtype=X.dtype, device=X.device)
        return self.ridge((X, t, weights, self.log_penalty), warm)

    def cv_loss(self, data: dict[str, Tensor]) -> Tensor:
        X, t, folds = data["X"], data["t"], data["folds"]
        wb = self.fit(X, t, folds, self.warm)
        self.warm = wb.detach()
        held = 1 - folds
        sq = (wb[:, :-1] @ X.T + wb[:, -1:] - t).square()
        return ((held * sq).sum(-1) / held.sum(-1)).mean()

    def training_step(self, data, _idx):
        cv = self.cv_loss(data)
        loss = cv + self.spread_weight * (self.log_penalty - self.log_penalty.mean()).square().mean()
        self.log_dict({"train_loss": loss, "train_cv_loss": cv}, prog_bar=True, batch_size=1)
        return loss

    def validation_step(self, data, _idx):
        self.log("val_loss", self.cv_loss(data), batch_size=1)

    def test_step(self, data, _idx):
        X, t, X_test, t_test = data["X"], data["t"], data["X_test"], data["t_test"]
        wb = self.fit(X, t, torch.ones_like(t))  # refit on every training row
        test_loss = (X_test @ wb[:-1] + wb[-1] - t_test).square().mean()
        baseline = RidgeCV(alphas=np.logspace(-3, 4, 60)).fit(X.cpu().numpy(), t.cpu().numpy())
        ridgecv = float(np.mean((baseline.predict(X_test.cpu().numpy()) - t_test.cpu().numpy()) ** 2))
        penalties = self.log_penalty.detach().exp()
        medians = {"penalty_real_median": penalties[: self.n_real].median()}
        if len(penalties) > self.n_real:
            medians["penalty_noise_median"] = penalties[self.n_real:].median()
        self.log_dict({"test_loss": test_loss, "ridgecv_test_loss": ridgecv,
                       "ridgecv_alpha": float(baseline.alpha_), **medians}, batch_size=1)
