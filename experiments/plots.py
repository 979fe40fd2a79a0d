"""PNG plots of a run: training curves and solver statistics over training (matplotlib, Agg).

Conventions: a panel whose values are positive and span more than two decades (their orders
of magnitude differ by two or more, as for 1e-5 … 1.4e-7) gets a log axis; each validation
metric has a panel of its own, so one metric's scale does not flatten another's; the solver
panels show only the solves that iterate (a direct solve, one "iteration" every step, would be
a flat line); the fraction of converged samples is drawn on a fixed [0, 1] axis (with a little headroom).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DECADES = 2  # a log axis when the orders of magnitude of a panel's values differ by this much
COLUMNS = 4  # panels per row


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def spans_decades(values: Iterable[float], decades: int = DECADES) -> bool:
    """True when every value is positive and finite and the orders of magnitude of the
    largest and the smallest differ by ``decades`` or more."""
    values = [v for v in values if v == v]  # NaNs carry no scale
    if not values or min(values) <= 0 or max(values) == float("inf"):
        return False
    return math.floor(math.log10(max(values))) - math.floor(math.log10(min(values))) >= decades


def _scale_y(ax, rows: list[dict], keys: Iterable[str]) -> None:
    if spans_decades(r[k] for r in rows for k in keys if k in r):
        ax.set_yscale("log")


def training_curves_figure(steps: list[dict], evals: list[dict]) -> Figure:
    """Training loss per step with the validation losses, then one panel for each other
    ``val*`` metric per validation."""
    val_keys = sorted({k for r in evals for k in r if k.startswith("val")})
    losses = [k for k in val_keys if "loss" in k]
    other = [k for k in val_keys if "loss" not in k]
    panels = 1 + len(other)
    cols = min(panels, COLUMNS)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1 + 4.2 * cols, 3.4 * rows), squeeze=False)
    ax = axes.flat[0]
    ax.plot(*_series(steps, "train_loss"), lw=1, label="train_loss")
    for key in losses:
        ax.plot(*_series(evals, key), "o-", ms=3, label=key)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    _scale_y(ax, steps + evals, ["train_loss", *losses])
    ax.legend()
    for ax, key in zip(axes.flat[1:], other):
        ax.plot(*_series(evals, key), "o-", ms=3)
        ax.set(xlabel="step", title=key)
        _scale_y(ax, evals, [key])
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
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
            ax.plot(*_series(steps, key), lw=1, label=key.removeprefix("solver/"))
        ax.set(xlabel="step", title=title)
        if what == "frac_converged":  # fixed: a line at 1.0 sits just below the frame
            ax.set_ylim(0, 1.04)
            ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
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
