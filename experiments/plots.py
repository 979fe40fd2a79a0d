"""PNG plots of a run: training curves and solver statistics over training (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training_curves(steps: list[dict], evals: list[dict], path: Path) -> Path:
    """Training loss per step and every logged ``val*`` metric per validation."""
    val_keys = sorted({k for r in evals for k in r if k.startswith("val")})
    other = [k for k in val_keys if "loss" not in k]
    fig, axes = plt.subplots(1, 1 + bool(other), figsize=(5 + 5 * bool(other), 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot(*_series(steps, "train_loss"), lw=1, label="train_loss")
    for key in (k for k in val_keys if "loss" in k):
        ax.plot(*_series(evals, key), "o-", ms=3, label=key)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    if all(r.get("train_loss", 1.0) > 0 for r in steps):
        ax.set_yscale("log")
    ax.legend()
    if other:
        ax = axes[0, 1]
        for key in other:
            ax.plot(*_series(evals, key), "o-", ms=3, label=key)
        ax.set(xlabel="step", title="validation metrics")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_solver_stats(steps: list[dict], path: Path) -> Path:
    """Iterations, residual and fraction converged of the forward and backward solves."""
    panels = (("iterations", "iterations (mean)", False), ("residual", "max residual", True),
              ("frac_converged", "fraction converged", False))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, (suffix, title, log) in zip(axes, panels):
        keys = sorted({k for r in steps for k in r if k.startswith("solver/") and k.endswith(suffix)})
        for key in keys:
            ax.plot(*_series(steps, key), lw=1, label=key.removeprefix("solver/"))
        ax.set(xlabel="step", title=title)
        if log and keys and all(r[k] > 0 for r in steps for k in keys if k in r):
            ax.set_yscale("log")
        if keys:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
