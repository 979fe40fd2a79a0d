"""Every experiment runs end to end: fast_dev_run, a short real run whose loss decreases,
outputs (summary.json, plots, CSV logs, checkpoint), and resuming a killed run."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.experiments.conftest import experiment_params, needs_layer, run, stats_callback

# The solves each experiment's layer reports at least (the dense equality-QP backend reports none;
# the Lyapunov layer is a direct solve whose backward reuses the forward factorization).
REPORTED = {"deq_digits": ("forward", "backward"), "lqr_lyapunov": ("forward",),
            "qp_decision": ("forward",), "rootfind_eos": ("forward", "backward"), "qp_sudoku": ("forward",),
            "lp_shortest_path": ("forward",),
            "hyperparam_ridge": ("forward", "backward")}

# Small but real settings per experiment: a few epochs on reduced data.
SHORT = {
    "deq_digits": ["trainer.max_epochs=2", "data.batch_size=128"],
    "lqr_lyapunov": ["trainer.max_epochs=1", "data.steps_per_epoch=4"],
    "qp_decision": ["trainer.max_epochs=2", "data.n=600"],
    "rootfind_eos": ["trainer.max_epochs=3", "data.n=200"],
    "qp_sudoku": ["trainer.max_epochs=1", "data.n=300"],
    "lp_shortest_path": ["trainer.max_epochs=2", "data.n_train=256", "data.n_val=50", "data.n_test=100",
                         "model.surrogate.samples=4", "model.spo_plus.epochs=1"],
    "hyperparam_ridge": ["trainer.max_epochs=2", "data.steps_per_epoch=5"],
}


@pytest.mark.parametrize("name", experiment_params())
def test_fast_dev_run(name, tmp_path):
    summary = run(tmp_path, f"experiment={name}", "trainer.fast_dev_run=true")
    record = json.loads(Path(summary["path"]).read_text())
    assert record["experiment"] == name
    assert set(record["config"]["targets"]) <= set(record["metrics"]), "target metrics are reported"
    assert all(isinstance(v, float) for v in record["metrics"].values())


@pytest.mark.parametrize("name", experiment_params())
def test_short_run_decreases_the_loss_and_writes_outputs(name, tmp_path):
    summary = run(tmp_path, f"experiment={name}", *SHORT[name])
    steps = stats_callback(summary).steps
    losses = [r["train_loss"] for r in steps]
    k = max(1, len(losses) // 4)
    assert sum(losses[-k:]) / k < sum(losses[:k]) / k, losses
    # solver statistics logged at every step next to the loss
    logged = {f"solver/{phase}_{what}" for phase in REPORTED[name]
              for what in ("iterations", "iterations_max", "residual", "frac_converged")}
    assert all(logged <= set(r) for r in steps)
    assert all(r.get("solver/forward_frac_converged", 1.0) == 1.0 for r in steps)
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", *logged} <= set(header)
    record = json.loads((tmp_path / "summary.json").read_text())
    iterated = any(v > 1 for r in steps for k, v in r.items() if k.endswith("_iterations_max"))
    plots = {"training_curves.png"} | ({"solver_stats.png"} if iterated else set())
    assert {Path(p).name for p in record["plots"]} == plots
    assert all(Path(p).stat().st_size > 1000 for p in record["plots"])
    # one checkpoint file per save; last.ckpt links to it
    (saved,) = [p for p in (tmp_path / "checkpoints").iterdir() if not p.is_symlink()]
    assert (tmp_path / "checkpoints" / "last.ckpt").resolve() == saved.resolve()


class KillAtEpoch(pl.Callback):
    """Stands in for a kill: the run dies at the start of ``epoch`` (after the checkpoint of
    the previous epoch was written) without any chance to save."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt("killed")


@needs_layer("rootfind_eos")
def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    common = ["experiment=rootfind_eos", "data.n=200", "trainer.max_epochs=4", "test=false"]
    full = run(tmp_path / "full", *common)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(tmp_path / "killed", *common,
            "+callbacks.kill._target_=tests.experiments.test_runs.KillAtEpoch",
            "+callbacks.kill.epoch=2")
    ckpt = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1  # saved after epochs 0 and 1
    resumed = run(tmp_path / "resumed", *common, f"ckpt_path={ckpt}")
    # it continued where it stopped (epochs 2, 3) ...
    steps = stats_callback(resumed).steps
    assert [r["epoch"] for r in steps] == [0.0, 1.0, 2.0, 3.0]  # history restored from the ckpt
    assert resumed["trainer"].global_step == full["trainer"].global_step == 4
    # ... and ended exactly where the uninterrupted run ended (seeded and reproducible)
    for p, q in zip(full["model"].parameters(), resumed["model"].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["resumed_from"] == str(ckpt)
