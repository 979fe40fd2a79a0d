"""The sweep summary: per configuration, each metric's mean ± std over seeds (CSV, Markdown, PNG)."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from experiments.sweep import configurations, write_sweep_summary


def fake_run(path, seed: int, lr: float, acc: float, err: float) -> dict:
    record = {"experiment": "deq_digits", "seed": seed,
              "overrides": ["experiment=deq_digits", f"seed={seed}", f"model.optimizer.lr={lr}"],
              "metrics": {"test_acc": acc, "gain_error": err},
              "targets": {"test_acc": {"target": ">= 0.9", "value": acc, "met": acc >= 0.9}}}
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(record))
    return record


def test_sweep_summary_groups_runs_by_configuration_and_averages_over_seeds(tmp_path):
    accs = {0.1: [0.91, 0.95, 0.89], 0.01: [0.97, 0.98, 0.96]}
    errs = {0.1: [1e-3, 2e-3, 4e-3], 0.01: [1e-7, 3e-7, 2e-7]}
    job = 0
    for lr in accs:
        for seed in range(3):
            fake_run(tmp_path / str(job), seed, lr, accs[lr][seed], errs[lr][seed])
            job += 1
    paths = write_sweep_summary(tmp_path)
    assert set(paths) == {"csv", "md", "png"}
    with paths["csv"].open() as fh:
        rows = {(r["configuration"], r["metric"]): r for r in csv.DictReader(fh)}
    for lr, values in accs.items():
        row = rows[(f"model.optimizer.lr={lr}", "test_acc")]
        assert int(row["n"]) == 3
        assert float(row["mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["std"]) == pytest.approx(statistics.stdev(values))
        assert float(row["min"]) == min(values) and float(row["max"]) == max(values)
    assert float(rows[("model.optimizer.lr=0.1", "targets_met")]["mean"]) == pytest.approx(2 / 3)
    md = paths["md"].read_text()
    assert "| **test_acc** | 0.9167 ± 0.03055 | 0.97 ± 0.01 |" in md
    assert "| targets_met | 2/3 | 3/3 |" in md
    assert paths["png"].stat().st_size > 1000


def test_configurations_name_only_what_varies():
    records = [{"experiment": "e", "overrides": ["experiment=e", f"seed={s}", "data.n=10"]}
               for s in range(2)]
    assert configurations(records) == ["e", "e"]  # seeds only: one configuration
    records.append({"experiment": "e", "overrides": ["experiment=e", "seed=0", "data.n=20"]})
    assert configurations(records) == ["data.n=10", "data.n=10", "data.n=20"]


def test_a_sweep_without_summaries_writes_nothing(tmp_path):
    assert write_sweep_summary(tmp_path) == {}
    assert list(tmp_path.iterdir()) == []
