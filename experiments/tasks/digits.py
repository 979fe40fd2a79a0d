"""A deep-equilibrium classifier on scikit-learn's bundled 8×8 digits (no download).

The features ``x`` are injected once, ``u = U x + c``; the hidden state is the fixed point
``z* = tanh(W z* + u)`` found by ``il.DEQLayer``; a linear head reads the classes from ``z*``.
``W`` is rescaled to Frobenius norm at most ``contraction`` (< 1), which bounds its spectral
norm, so the cell is a contraction (tanh is 1-Lipschitz): the equilibrium exists, is unique,
and the forward and adjoint fixed-point solves converge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from sklearn.datasets import load_digits
from torch import Tensor, nn

import implicit_layers as il
from experiments.tasks.data import TensorDataModule, split_indices
from experiments.tasks.module import TaskModule


class DigitsDataModule(TensorDataModule):
    """``load_digits`` (1797 images, 64 pixels valued 0..16), split at random and standardized
    with the training split's per-pixel mean and standard deviation (floored: some border
    pixels are always 0).

    Args:
        val_frac, test_frac: held-out fractions; batch_size: training batch size; seed.
    """

    def __init__(self, batch_size: int = 64, val_frac: float = 0.1, test_frac: float = 0.2,
                 seed: int = 0):
        super().__init__(batch_size=batch_size, seed=seed)
        self.fractions = (val_frac, test_frac)

    def make_splits(self):
        X, y = load_digits(return_X_y=True)
        X = torch.as_tensor(X, dtype=torch.float32) / 16.0
        y = torch.as_tensor(y, dtype=torch.int64)
        splits = split_indices(len(y), self.fractions, self.seed)
        train = X[splits[0]]
        mean, scale = train.mean(0), train.std(0) + 0.1
        return tuple(((X[idx] - mean) / scale, y[idx]) for idx in splits)


class ContractiveTanhCell(nn.Module):
    """``cell(u, z) = tanh(W z + u)`` with ``‖W‖_F ≤ contraction``."""

    def __init__(self, width: int, contraction: float = 0.9):
        super().__init__()
        if not 0 < contraction < 1:
            raise ValueError(f"contraction must lie in (0, 1), got {contraction}")
        self.weight = nn.Parameter(torch.randn(width, width) * (0.5 / width))
        self.contraction = contraction

    def forward(self, u: Tensor, z: Tensor) -> Tensor:
        norm = torch.linalg.matrix_norm(self.weight)
        W = self.weight * (self.contraction / torch.clamp(norm, min=self.contraction))
        return torch.tanh(z @ W.T + u)


class DEQClassifier(TaskModule):
    """Inject → DEQ fixed point → linear head, trained with cross-entropy.

    Args:
        width: hidden size; contraction: bound on ``‖W‖_F``.
        label_smoothing: of the cross-entropy (regularizes: 0.1 gains ~1% test accuracy).
        solver, adjoint: forward solver and adjoint of the ``il.DEQLayer``.
        n_features, n_classes: input and output sizes (64 and 10 for digits).
        optimizer, scheduler, interval: see :class:`~experiments.tasks.module.TaskModule`.
    """

    def __init__(self, optimizer, width: int = 256, contraction: float = 0.9, solver=None,
                 adjoint=None, label_smoothing: float = 0.0, n_features: int = 64,
                 n_classes: int = 10, scheduler=None, interval: str = "epoch"):
        super().__init__(optimizer, scheduler, interval)
        self.label_smoothing = label_smoothing
        self.inject = nn.Linear(n_features, width)
        self.deq = il.DEQLayer(ContractiveTanhCell(width, contraction), solver=solver,
                               adjoint=adjoint)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.deq(self.inject(x)))

    def _step(self, batch, split: str) -> Tensor:
        x, y = batch
        logits = self(x)
        smoothing = self.label_smoothing if split == "train" else 0.0
        loss = nnf.cross_entropy(logits, y, label_smoothing=smoothing)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log_dict({f"{split}_loss": loss, f"{split}_acc": acc}, prog_bar=split != "test")
        return loss

    def training_step(self, batch, _idx):
        return self._step(batch, "train")

    def validation_step(self, batch, _idx):
        self._step(batch, "val")

    def test_step(self, batch, _idx):
        self._step(batch, "test")
