"""The command line: ``python -m experiments.train`` (the README's default command) and ``-m``."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.train import clean_up_failed_run
from tests.experiments.conftest import needs_layer

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m experiments.train ARGS``; on a timeout, kill it with every process it
    started (DDP ranks) and fail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-m", "experiments.train", *args, "trainer.enable_progress_bar=false"]
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.communicate()
            raise
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@needs_layer("rootfind_eos")
def test_multirun_sweeps_seeds_into_separate_run_dirs(tmp_path):
    proc = cli("-m", "experiment=rootfind_eos", "seed=0,1", "data.n=100", "trainer.max_epochs=1",
               f"paths.root={tmp_path}")
    summaries = sorted(tmp_path.glob("rootfind_eos/multirun_*/*/summary.json"))
    assert len(summaries) == 2
    records = [json.loads(p.read_text()) for p in summaries]
    assert [r["seed"] for r in records] == [0, 1]
    assert records[0]["metrics"]["a"] != records[1]["metrics"]["a"]  # different data
    assert all(f"summary: {p}" in proc.stdout for p in summaries), proc.stdout
    # the sweep's summary: mean ± std over the two seeds, next to the runs
    sweep = summaries[0].parents[1]
    with (sweep / "sweep_summary.csv").open() as fh:
        rows = {r["metric"]: r for r in csv.DictReader(fh)}
    values = [r["metrics"]["param_rel_error"] for r in records]
    assert int(rows["param_rel_error"]["n"]) == 2
    assert float(rows["param_rel_error"]["mean"]) == pytest.approx(statistics.fmean(values))
    assert float(rows["param_rel_error"]["std"]) == pytest.approx(statistics.stdev(values))
    assert "**param_rel_error**" in (sweep / "sweep_summary.md").read_text()
    assert (sweep / "sweep_summary.png").stat().st_size > 1000


@needs_layer("deq_digits")
def test_default_command_runs_deq_digits_logs_its_key_lines_and_keeps_one_checkpoint_per_save(tmp_path):
    proc = cli("trainer.max_epochs=2", "trainer.limit_train_batches=1", "model.width=16",
               f"paths.root={tmp_path}")
    (summary,) = tmp_path.glob("deq_digits/*/summary.json")
    run_dir = summary.parent
    assert json.loads(summary.read_text())["experiment"] == "deq_digits"
    assert f"run dir: {run_dir}" in proc.stdout
    log = (run_dir / "train.log").read_text()
    assert "seed 0, run dir" in log and "test_acc=" in log and "summary: " in log
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert files == ["epoch=1-step=2.ckpt", "last.ckpt"]
    assert (run_dir / "checkpoints" / "last.ckpt").resolve().name == "epoch=1-step=2.ckpt"


def test_a_run_that_fails_before_any_output_removes_its_directory(tmp_path):
    proc = cli("experiment=rootfind_eos", "model.a_init=-1", f"paths.root={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "removed its directory" in proc.stdout + proc.stderr
    assert list((tmp_path / "rootfind_eos").iterdir()) == []


def test_a_failed_run_with_output_says_where_it_is_and_one_without_is_removed(tmp_path, caplog):
    kept, empty = tmp_path / "kept", tmp_path / "empty"
    for run_dir in (kept, empty):
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (run_dir / "train.log").write_text("")
    (kept / "checkpoints").mkdir()
    with caplog.at_level(logging.INFO, logger="experiments.train"):
        clean_up_failed_run(kept)
        clean_up_failed_run(empty)
    assert kept.is_dir() and not empty.exists()
    assert f"partial output is in {kept} (checkpoints)" in caplog.text
    assert f"removed its directory {empty}" in caplog.text


def test_help_lists_only_the_groups_train_accepts():
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    groups = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    names = {line.split(":")[0] for line in groups.splitlines() if ": " in line}
    assert names == {"callbacks", "data", "experiment", "logger", "model", "trainer"}
    assert "bench" not in groups
