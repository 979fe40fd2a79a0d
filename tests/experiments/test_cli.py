"""The command line: ``python -m experiments.train`` (the README's default command) and ``-m``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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


@needs_layer("deq_digits")
def test_default_command_runs_deq_digits(tmp_path):
    proc = cli("trainer.fast_dev_run=true", f"paths.root={tmp_path}")
    (summary,) = tmp_path.glob("deq_digits/*/summary.json")
    assert json.loads(summary.read_text())["experiment"] == "deq_digits"
    assert f"run dir: {summary.parent}" in proc.stdout
