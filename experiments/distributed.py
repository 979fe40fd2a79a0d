"""Hydra meets Lightning's DDP launcher: every process of a run works in that run's directory.

With ``trainer.strategy=ddp trainer.devices=N`` on one machine, Lightning starts ranks
1 … N−1 by running the command line again, with ``hydra.run.dir`` appended. Inside a ``-m``
sweep that goes wrong twice: the command line is the whole sweep (each rank would start a
sweep of its own) and ``hydra.run.dir`` is not the job's directory. So the launching process
records its job, the job's overrides and its output directory, in an environment variable
before fitting (:func:`export_job`); a rank that Lightning started rebuilds its command line
from it (:func:`rank_argv`) before Hydra parses it, and joins that one job.

Processes started by a cluster (SLURM, ``torchrun``) run the command line they were given and
are left alone: give them one run directory (``hydra.run.dir=...``, see the README).
"""

from __future__ import annotations

import json
import os

JOB = "EXPERIMENTS_DDP_JOB"


def export_job(overrides: list[str], output_dir: str) -> None:
    """Record the job that the ranks Lightning is about to start must join."""
    os.environ[JOB] = json.dumps({"overrides": list(overrides), "output_dir": str(output_dir)})


def rank_argv(argv: list[str], environ=os.environ) -> list[str]:
    """The command line of a rank that Lightning started (``LOCAL_RANK`` > 0 and a recorded
    job): the job's overrides in the job's directory; otherwise ``argv`` unchanged.

    >>> env = {"LOCAL_RANK": "1", JOB: '{"overrides": ["seed=1"], "output_dir": "runs/1"}'}
    >>> rank_argv(["train.py", "-m", "seed=0,1", 'hydra.run.dir="x"'], env)[1:]
    ['seed=1', 'hydra.run.dir="runs/1"', 'hydra.job.name=train_ddp_process_1', 'hydra.output_subdir=null']
    """
    rank = environ.get("LOCAL_RANK", "0")
    if rank == "0" or JOB not in environ:
        return argv
    job = json.loads(environ[JOB])
    return [argv[0], *job["overrides"], f'hydra.run.dir="{job["output_dir"]}"',
            f"hydra.job.name=train_ddp_process_{rank}", "hydra.output_subdir=null"]
