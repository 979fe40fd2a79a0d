"""What every task's LightningModule shares: an optimizer (and optional LR scheduler) given
by the config as a partial, e.g. ``{_target_: torch.optim.Adam, _partial_: true, lr: 1e-3}``,
and what makes a task correct under distributed data parallel (DDP) without any change to it.

Under DDP (``trainer.strategy=ddp trainer.devices=N``) every rank sees its own shard of each
batch, so two things a single process gets for free need care:

* **Evaluation metrics** are reduced across ranks exactly. Every epoch-level ``self.log`` of a
  validation or test step goes into a ``torchmetrics`` aggregator (its ``reduce_fx``: a mean
  weighted by the batch size, a sum, a max or a min) that all-gathers its state at the end of
  the epoch, so the value is the one a single process would compute over all samples, each
  counted once when the data module shards without padding
  (:class:`~experiments.tasks.data.TensorDataModule` does). (Lightning's own
  ``sync_dist=True`` averages the per-rank sample counts as integers: with shards of 180 and
  179 samples it divides by 179.)
* **The loss the optimizer sees** is the mean over ranks. DDP averages the gradients, but a
  closure-driven optimizer (L-BFGS with a line search) also compares loss *values*; with each
  rank's own value the ranks would take different line-search branches, call backward a
  different number of times and deadlock in DDP's gradient all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, Metric, MinMetric, SumMetric

# Lightning's reduce_fx names -> the aggregator that reduces the logged values across ranks
AGGREGATORS = {"mean": MeanMetric, "avg": MeanMetric, "sum": SumMetric, "max": MaxMetric,
               "amax": MaxMetric, "min": MinMetric, "amin": MinMetric}


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
        self.eval_aggregators = nn.ModuleDict()  # stage/name -> Metric, created as logged (DDP only)
        self._eval_batch = None

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return opt
        sched = {"scheduler": self.scheduler_factory(opt), "interval": self.interval}
        return {"optimizer": opt, "lr_scheduler": sched}

    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def log(self, name: str, value, *args, **kwargs) -> None:
        """``LightningModule.log``; under DDP, epoch-level validation and test values are
        aggregated by a ``torchmetrics`` metric that reduces them exactly across ranks."""
        if (args or not self._distributed() or not self.trainer.evaluating or isinstance(value, Metric)
                or kwargs.get("on_step") or kwargs.get("on_epoch") is False):
            super().log(name, value, *args, **kwargs)
            return
        fx = kwargs.pop("reduce_fx", "mean")
        fx = getattr(fx, "__name__", fx)
        batch_size = kwargs.pop("batch_size", None)
        kwargs.pop("sync_dist", None)
        key = f"{'test' if self.trainer.testing else 'validation'}/{name}".replace(".", ":")
        if key not in self.eval_aggregators:
            # a NaN stays NaN, as in one process ("disable" would also drop the weights)
            self.eval_aggregators[key] = AGGREGATORS[fx](nan_strategy=float("nan")).to(self.device)
        aggregator = self.eval_aggregators[key]
        value = torch.as_tensor(value, device=self.device).detach()
        if isinstance(aggregator, MeanMetric):
            if batch_size is None:
                batch_size = extract_batch_size(self._eval_batch)
            aggregator.update(value, weight=batch_size)
        else:
            aggregator.update(value)
        super().log(name, aggregator, metric_attribute=f"eval_aggregators.{key}", **kwargs)

    def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch = batch  # for the batch size of what the step logs

    def on_test_batch_start(self, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch = batch

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Step with a closure whose loss is the mean over ranks (identical on all of them)."""
        closure = optimizer_closure
        if self._distributed() and optimizer_closure is not None:
            def closure():
                loss = optimizer_closure()
                if loss is None:  # a skipped step: nothing to agree on
                    return loss
                return self.trainer.strategy.reduce(loss.detach().clone(), reduce_op="mean")
        optimizer.step(closure=closure)

