"""Experiment loggers: CSV always; TensorBoard as well when it is installed."""

from __future__ import annotations

import importlib.util

from lightning.pytorch.loggers import TensorBoardLogger


def tensorboard_if_installed(save_dir: str, name: str = "tensorboard",
                             version: str | int | None = None) -> TensorBoardLogger | None:
    """A ``TensorBoardLogger``, or ``None`` (no logger) when neither ``tensorboard`` nor
    ``tensorboardX`` is installed."""
    if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        return None
    return TensorBoardLogger(save_dir=save_dir, name=name, version=version)
