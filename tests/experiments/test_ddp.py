"""Distributed data parallel on CPU (gloo): a 2-process run reports the same test metric as a
single process evaluating its checkpoint, once, from rank 0, into one run directory."""

from __future__ import annotations

import json

import lightning.pytorch as pl
from hydra.utils import instantiate

from experiments.distributed import JOB, rank_argv
from tests.experiments.conftest import compose_cfg, needs_layer
from tests.experiments.test_cli import cli

# a tiny budget: the point is the evaluation, not the training
TINY = ["experiment=deq_digits", "model.width=32", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2"]


@needs_layer("deq_digits")
def test_two_process_ddp_run_matches_single_process_evaluation_of_its_checkpoint(tmp_path):
    proc = cli(*TINY, "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
               f"paths.root={tmp_path}")
    (run_dir,) = [p for p in (tmp_path / "deq_digits").iterdir()]
    record = json.loads((run_dir / "summary.json").read_text())
    assert record["world_size"] == 2
    assert proc.stdout.count("summary: ") == 1, proc.stdout  # one result, from rank 0
    assert "test_acc=" in (run_dir / "train.log").read_text()
    assert "summary: " not in (run_dir / "train_ddp_process_1.log").read_text()

    # the same checkpoint evaluated by one process on the whole test split
    cfg = compose_cfg(*TINY, out=tmp_path / "single")
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path / "single")
    (single,) = trainer.test(model, datamodule=datamodule, verbose=False,
                             ckpt_path=str(run_dir / "checkpoints" / "last.ckpt"))
    n_test = len(datamodule.splits["test"])
    assert n_test % 2 == 1  # the shards differ in size: a padded shard would repeat a sample
    ddp_acc = record["metrics"]["test_acc"]
    assert abs(ddp_acc - single["test_acc"]) < 1e-6, (ddp_acc, single["test_acc"])
    # every test sample counted once: the accuracy is (correct samples) / n_test
    assert abs(ddp_acc * n_test - round(ddp_acc * n_test)) < 1e-3
    assert abs(record["metrics"]["test_loss"] - single["test_loss"]) < 1e-5


def test_a_rank_started_by_lightning_joins_its_job_not_the_sweep():
    env = {"LOCAL_RANK": "1",
           JOB: json.dumps({"overrides": ["seed=1", "paths.root=/r"], "output_dir": "/r/x/1"})}
    argv = ["train.py", "-m", "seed=0,1", "paths.root=/r", 'hydra.run.dir="/r/x/run"',
            "hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null"]
    assert rank_argv(argv, env) == ["train.py", "seed=1", "paths.root=/r", 'hydra.run.dir="/r/x/1"',
                                    "hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null"]
    assert rank_argv(argv, {**env, "LOCAL_RANK": "0"}) == argv  # the launching process
    assert rank_argv(argv, {"LOCAL_RANK": "1"}) == argv  # started by a cluster, not by us
