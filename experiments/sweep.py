"""After a ``-m`` sweep: every metric's mean ± standard deviation over seeds, per configuration.

Hydra calls :class:`SweepSummary` (``hydra.callbacks`` in ``configs/train.yaml``) once all
jobs of a sweep have finished, with any launcher (local or a cluster's). It reads the
``summary.json`` of every run under the sweep directory, groups the runs into configurations
by their overrides other than ``seed``, and writes into the sweep directory

* ``sweep_summary.csv``: one row per (configuration, metric): n, mean, std, min, max;
* ``sweep_summary.md``: one row per metric, one column per configuration, ``mean ± std``,
  the declared targets first, and how many runs met all of them;
* ``sweep_summary.png``: each target metric (or the first test metrics) per configuration,
  every seed as a dot and mean ± std as an error bar.

The standard deviation is the sample one (``n − 1``); with a single seed it is left empty.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments.plots import plt, save, spans_decades
from experiments.tables import format_cell, markdown_table

log = logging.getLogger(__name__)
CSV_COLUMNS = ["configuration", "metric", "n", "mean", "std", "min", "max"]
NAMES = {"csv": "sweep_summary.csv", "md": "sweep_summary.md", "png": "sweep_summary.png"}


def collect(sweep_dir: Path) -> list[dict]:
    """Every run's ``summary.json`` under ``sweep_dir``, in path order."""
    return [json.loads(p.read_text()) for p in sorted(Path(sweep_dir).rglob("summary.json"))]


def _override_dict(record: dict) -> dict[str, str]:
    pairs = (o.lstrip("+~").split("=", 1) for o in record.get("overrides", []) if "=" in o)
    return {k: v for k, v in pairs if k != "seed"}


def configurations(records: list[dict]) -> list[str]:
    """Each run's configuration: the overrides (other than ``seed``) that differ between the
    runs, e.g. ``"model.solver.m=5"``; the experiment's name when nothing but seeds varied."""
    overrides = [_override_dict(r) for r in records]
    keys = sorted({k for o in overrides for k in o})
    varying = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    return [" ".join(f"{k}={o.get(k, '-')}" for k in varying) or r.get("experiment", "runs")
            for o, r in zip(overrides, records)]


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (configuration, metric): ``n``, ``mean``, ``std``, ``min``, ``max`` and the
    ``values`` of the runs (``targets_met``: 1.0 for each run that met all its targets)."""
    groups: dict[str, list[dict]] = {}
    for config, record in zip(configurations(records), records):
        groups.setdefault(config, []).append(record)
    rows = []
    for config, runs in groups.items():
        metrics = sorted({m for r in runs for m in r["metrics"]})
        for metric in metrics:
            values = [float(r["metrics"][metric]) for r in runs if metric in r["metrics"]]
            rows.append({"configuration": config, "metric": metric, "n": len(values),
                         "mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else None,
                         "min": min(values), "max": max(values), "values": values})
        met = [float(all(t["met"] for t in r.get("targets", {}).values())) for r in runs]
        rows.append({"configuration": config, "metric": "targets_met", "n": len(met),
                     "mean": statistics.fmean(met), "std": None, "min": min(met), "max": max(met),
                     "values": met})
    return rows


def _targets(records: list[dict]) -> list[str]:
    return sorted({t for r in records for t in r.get("targets", {})})


def markdown(rows: list[dict], targets: list[str]) -> str:
    """Metrics as rows (targets first, ``targets_met`` as "k/n"), configurations as columns."""
    configs = list(dict.fromkeys(r["configuration"] for r in rows))
    cells = {(r["configuration"], r["metric"]): r for r in rows}
    metrics = sorted({r["metric"] for r in rows} - {"targets_met"},
                     key=lambda m: (m not in targets, m))
    table = []
    for metric in ["targets_met", *metrics]:
        line = {"metric": f"**{metric}**" if metric in targets else metric}
        for config in configs:
            r = cells.get((config, metric))
            if r is None:
                line[config] = ""
            elif metric == "targets_met":
                line[config] = f"{round(r['mean'] * r['n'])}/{r['n']}"
            else:
                std = f" ± {format_cell(r['std'])}" if r["std"] is not None else ""
                line[config] = f"{format_cell(r['mean'])}{std}"
        table.append(line)
    return markdown_table(table)


def plot(rows: list[dict], metrics: list[str], path: Path) -> Path:
    """One panel per metric: each configuration's seeds (dots) and mean ± std (error bar)."""
    configs = list(dict.fromkeys(r["configuration"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(1.5 + 3.5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        stats = {r["configuration"]: r for r in rows if r["metric"] == metric}
        xs = [i for i, c in enumerate(configs) if c in stats]
        means = [stats[configs[i]]["mean"] for i in xs]
        stds = [stats[configs[i]]["std"] or 0.0 for i in xs]
        ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=4, color="C0", label="mean ± std")
        for i in xs:
            seeds = stats[configs[i]]["values"]
            ax.plot([i] * len(seeds), seeds, ".", color="C1", alpha=0.7)
        ax.set_xticks(range(len(configs)), configs, rotation=20, ha="right", fontsize=7)
        ax.set_title(metric)
        if spans_decades(v for i in xs for v in stats[configs[i]]["values"]):
            ax.set_yscale("log")
    fig.tight_layout()
    return save(fig, path)


def write_sweep_summary(sweep_dir: Path) -> dict[str, Path]:
    """Write the CSV, Markdown and PNG summaries into ``sweep_dir``; return their paths
    (nothing when no run of the sweep wrote a summary)."""
    sweep_dir = Path(sweep_dir)
    records = collect(sweep_dir)
    if not records:
        log.warning("no summary.json under %s: no sweep summary", sweep_dir)
        return {}
    rows = aggregate(records)
    paths = {kind: sweep_dir / name for kind, name in NAMES.items()}
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    targets = _targets(records)
    paths["md"].write_text(f"# Sweep summary: {len(records)} runs\n\n"
                           f"mean ± std over seeds (n − 1); **bold**: a declared target\n\n"
                           f"{markdown(rows, targets)}\n")
    shown = targets or sorted({r["metric"] for r in rows if r["metric"].startswith("test")})[:4]
    if shown:
        plot(rows, shown, paths["png"])
    else:
        del paths["png"]
    log.info("sweep summary of %d runs: %s", len(records), ", ".join(str(p) for p in paths.values()))
    return paths


class SweepSummary(Callback):
    """Hydra callback: :func:`write_sweep_summary` into the sweep directory after ``-m``."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        write_sweep_summary(Path(config.hydra.sweep.dir))
