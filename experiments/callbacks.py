"""Lightning callbacks: the implicit layers' solver statistics, logged every training step
next to the task metrics, kept in a history that survives a resume, and plotted at the end."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

import implicit_layers as il
from experiments.plots import plot_solver_stats, plot_training_curves

# what is logged of each phase (forward / backward solve) of each implicit layer
LOGGED = {"iterations_mean": "iterations", "iterations_max": "iterations_max",
          "residual_max": "residual", "frac_converged": "frac_converged"}


def implicit_layers_of(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every submodule from ``implicit_layers`` that keeps solver statistics, by dotted name."""
    return {name: m for name, m in module.named_modules()
            if type(m).__module__.startswith("implicit_layers.") and hasattr(m, "stats")}


def phases(stats) -> dict[str, il.SolverStats]:
    """The solves a layer reported: a :class:`~implicit_layers.LayerStats` has forward,
    backward (and tangent) solves; a bare :class:`~implicit_layers.SolverStats` is a forward
    solve; ``None`` (a layer that reports nothing for this backend) has none."""
    if isinstance(stats, il.SolverStats):
        return {"forward": stats}
    if isinstance(stats, il.LayerStats):
        return {p: getattr(stats, p) for p in ("forward", "backward")
                if getattr(stats, p) is not None}
    return {}


def solver_metrics(module: torch.nn.Module) -> dict[str, float]:
    """``solver/{forward,backward}_{iterations,iterations_max,residual,frac_converged}`` of
    the module's implicit layers (prefixed by the layer's name when there are several)."""
    layers = implicit_layers_of(module)
    out = {}
    for name, layer in layers.items():
        prefix = "solver/" if len(layers) == 1 else f"solver/{name}/"
        for phase, stats in phases(layer.stats).items():
            summary = stats.summary()
            out.update({f"{prefix}{phase}_{short}": summary[key] for key, short in LOGGED.items()})
    return out


class SolverStatsLogger(pl.Callback):
    """Logs the solver statistics after every training step and plots the run at the end.

    The history (per step: training loss and solver statistics; per validation: the logged
    ``val*`` metrics) is part of the checkpoint, so the plots of a resumed run cover the
    whole run. At the end of fitting rank 0 writes ``training_curves.png`` and, when some
    solve iterated, ``solver_stats.png`` into ``out_dir``.

    Args:
        out_dir: where the plots go (``None``: the trainer's ``default_root_dir``).
        plots: set False to skip plotting.
    """

    def __init__(self, out_dir: str | None = None, plots: bool = True):
        self.out_dir, self.plots = out_dir, plots
        self.steps: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = solver_metrics(pl_module)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"step": float(trainer.global_step), "epoch": float(trainer.current_epoch), **metrics}
        if loss is not None:
            row["train_loss"] = float(loss.detach())
        self.steps.append(row)

    def on_validation_end(self, trainer, pl_module):  # every val metric has been reduced by now
        if trainer.sanity_checking:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith("val") and v.numel() == 1}
        if row:
            self.evals.append({"step": float(trainer.global_step),
                               "epoch": float(trainer.current_epoch), **row})

    def on_fit_end(self, trainer, pl_module):
        if not self.plots or not trainer.is_global_zero:
            return
        out = Path(self.out_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_training_curves(self.steps, self.evals, out / "training_curves.png")
        plot_solver_stats(self.steps, out / "solver_stats.png")  # if some solve iterated

    def state_dict(self) -> dict:
        return {"steps": self.steps, "evals": self.evals}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps, self.evals = list(state_dict["steps"]), list(state_dict["evals"])
