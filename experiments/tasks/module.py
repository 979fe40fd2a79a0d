"""What every task's LightningModule shares: an optimizer (and optional LR scheduler) given
by the config as a partial, e.g. ``{_target_: torch.optim.Adam, _partial_: true, lr: 1e-3}``."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl


class TaskModule(pl.LightningModule):
    """Base LightningModule: ``optimizer(params)`` and optional ``scheduler(optimizer)``.

    Args:
        optimizer: a callable building the optimizer from the parameters.
        scheduler: optional callable building an LR scheduler, stepped every ``interval``.
        interval: ``"epoch"`` or ``"step"``.
    """

    def __init__(self, optimizer: Callable, scheduler: Callable | None = None,
                 interval: str = "epoch"):
        super().__init__()
        if interval not in ("epoch", "step"):
            raise ValueError(f"interval must be 'epoch' or 'step', got {interval!r}")
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.interval = interval

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return opt
        sched = {"scheduler": self.scheduler_factory(opt), "interval": self.interval}
        return {"optimizer": opt, "lr_scheduler": sched}
