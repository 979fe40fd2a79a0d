"""PNG plots of a run: training curves and solver statistics over training (matplotlib, Agg).

Conventions: a panel whose (positive) values span more than two decades gets a log axis; the
solver panels show only the solves that iterate (a direct solve, one "iteration" every step,
would be a flat line); the fraction of converged samples is drawn on a fixed [0, 1] axis.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DECADES = 2  # a log axis when max / min of a panel's values exceeds 10**DECADES


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def spans_decades(values: Iterable[float], decades: float = DECADES) -> bool:
    """True when every value is positive and finite and max / min exceeds ``10**decades``."""
    values = [v for v in values if v == v]  # NaNs carry no scale
    if not values or min(values) <= 0 or max(values) == float("inf"):
        return False
    return max(values) / min(values) > 10**decades


def _scale_y(ax, rows: list[dict], keys: Iterable[str]) -> None:
    if spans_decades(r[k] for r in rows for k in keys if k in r):
        ax.set_yscale("log")


def training_curves_figure(steps: list[dict], evals: list[dict]) -> Figure:
    """Training loss per step (and validation losses); every other ``val*`` metric per
    validation in a second panel."""
    val_keys = sorted({k for r in evals for k in r if k.startswith("val")})
    losses = [k for k in val_keys if "loss" in k]
    other = [k for k in val_keys if "loss" not in k]
    fig, axes = plt.subplots(1, 1 + bool(other), figsize=(5 + 5 * bool(other), 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot(*_series(steps, "train_loss"), lw=1, label="train_loss")
    for key in losses:
        ax.plot(*_series(evals, key), "o-", ms=3, label=key)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    _scale_y(ax, steps + evals, ["train_loss", *losses])
    ax.legend()
    if other:
        ax = axes[0, 1]
        for key in other:
            ax.plot(*_series(evals, key), "o-", ms=3, label=key)
        ax.set(xlabel="step", title="validation metrics")
        _scale_y(ax, evals, other)
        ax.legend()
    fig.tight_layout()
    return fig


def iterative_solves(steps: list[dict]) -> list[str]:
    """The solves (``solver/[layer/]phase``) that took more than one iteration at some step."""
    solves = sorted({k.removesuffix("_iterations") for r in steps for k in r
                     if k.startswith("solver/") and k.endswith("_iterations")})
    return [s for s in solves
            if any(r.get(f"{s}_iterations_max", r.get(f"{s}_iterations", 0)) > 1 for r in steps)]


def solver_stats_figure(steps: list[dict]) -> Figure | None:
    """Iterations, residual and fraction converged of each iterative solve; ``None`` when no
    solve iterated (direct solves only)."""
    solves = iterative_solves(steps)
    if not solves:
        return None
    panels = (("iterations", "iterations (mean)"), ("residual", "max residual"),
              ("frac_converged", "fraction converged"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, (what, title) in zip(axes, panels):
        keys = [f"{s}_{what}" for s in solves]
        for key in keys:
            ax.plot(*_series(steps, key), lw=1, label=key.removeprefix("solver/"),
                    clip_on=what != "frac_converged")  # a line at 1.0 stays whole on the edge
        ax.set(xlabel="step", title=title)
        if what == "frac_converged":
            ax.set_ylim(0, 1)
        else:
            _scale_y(ax, steps, keys)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(steps: list[dict], evals: list[dict], path: Path) -> Path:
    """Write :func:`training_curves_figure` to ``path``."""
    return save(training_curves_figure(steps, evals), path)


def plot_solver_stats(steps: list[dict], path: Path) -> Path | None:
    """Write :func:`solver_stats_figure` to ``path``; nothing (``None``) when no solve iterated."""
    fig = solver_stats_figure(steps)
    return None if fig is None else save(fig, path)
