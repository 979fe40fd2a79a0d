"""The plots' conventions: log axes for values spanning decades, solver panels only for the
solves that iterate, the converged fraction on [0, 1]."""

from __future__ import annotations

import matplotlib.pyplot as plt

from experiments.plots import (
    iterative_solves,
    plot_solver_stats,
    solver_stats_figure,
    spans_decades,
    training_curves_figure,
)


def solver_rows(name: str, iterations: list[float], residuals: list[float]) -> list[dict]:
    return [{"step": float(i), f"solver/{name}_iterations": it, f"solver/{name}_iterations_max": it,
             f"solver/{name}_residual": res, f"solver/{name}_frac_converged": 1.0}
            for i, (it, res) in enumerate(zip(iterations, residuals))]


def merge(*row_lists: list[dict]) -> list[dict]:
    return [{k: v for rows in group for k, v in rows.items()} for group in zip(*row_lists)]


def test_spans_decades_needs_positive_values_two_orders_of_magnitude_apart():
    assert spans_decades([1e-5, 2e-6, 1e-7])
    assert spans_decades([1.0e-5, 1.4e-7])  # the LQR gain error: 1e-5 ... 1e-7
    assert not spans_decades([9e-6, 1.1e-7])  # within 1e-6 ... 1e-7 by order: not two decades
    assert not spans_decades([2.3, 0.5])
    assert not spans_decades([1e-5, 0.0])  # zero: no log axis
    assert not spans_decades([1e-5, -1.0])
    assert spans_decades([1e-5, float("nan"), 1e-8])  # NaNs carry no scale
    assert not spans_decades([])


def test_solver_panels_show_only_the_solves_that_iterate():
    direct = solver_rows("lyap/forward", [1.0] * 4, [1e-15] * 4)  # a direct solve
    newton = solver_rows("eos/forward", [5.0, 4.0, 3.0, 3.0], [1e-3, 1e-7, 1e-10, 1e-12])
    steps = merge(direct, newton)
    assert iterative_solves(steps) == ["solver/eos/forward"]
    fig = solver_stats_figure(steps)
    iters, residual, frac = fig.axes
    assert [t.get_text() for t in iters.get_legend().get_texts()] == ["eos/forward_iterations"]
    assert residual.get_yscale() == "log"  # 1e-3 .. 1e-12
    assert iters.get_yscale() == "linear"
    low, high = frac.get_ylim()
    assert low == 0.0 and 1.0 <= high <= 1.05
    plt.close(fig)


def test_no_solver_plot_when_every_solve_is_direct(tmp_path):
    steps = solver_rows("forward", [1.0] * 3, [1e-15] * 3)
    assert solver_stats_figure(steps) is None
    assert plot_solver_stats(steps, tmp_path / "solver_stats.png") is None
    assert not (tmp_path / "solver_stats.png").exists()


def test_each_validation_metric_has_its_own_panel_and_decades_get_a_log_axis():
    steps = [{"step": float(i), "train_loss": 2.0 - 0.1 * i} for i in range(5)]
    evals = [{"step": float(i), "val_loss": 1.5, "val_gain_rel_error": 10.0 ** -(3 + i),
              "val_cost_rel_gap": 1e-6 - 1e-6 * i}  # reaches 0 and goes negative: linear
             for i in range(5)]
    fig = training_curves_figure(steps, evals)
    loss, gap, gain = fig.axes
    assert (gap.get_title(), gain.get_title()) == ("val_cost_rel_gap", "val_gain_rel_error")
    assert loss.get_yscale() == "linear"  # 2.0 .. 1.6
    assert gain.get_yscale() == "log"  # 1e-3 .. 1e-7
    assert gap.get_yscale() == "linear"
    plt.close(fig)
