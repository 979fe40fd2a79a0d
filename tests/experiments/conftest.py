"""Compose experiment configs in-process and run them into ``tmp_path``."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

import implicit_layers as il
from experiments.train import CONFIGS, train

# experiment -> the layer it trains through (its test is skipped until that layer has landed)
EXPERIMENTS = {"deq_digits": "DEQLayer", "lqr_lyapunov": "LyapunovLayer",
               "qp_decision": "EqualityQPLayer", "rootfind_eos": "RootFindLayer",
               "qp_sudoku": "QPLayer", "lp_shortest_path": "PerturbedLP",
               "hyperparam_ridge": "ArgminLayer"}


def needs_layer(experiment: str):
    layer = EXPERIMENTS[experiment]
    return pytest.mark.skipif(not hasattr(il, layer), reason=f"il.{layer} has not landed yet")


def experiment_params():
    return [pytest.param(name, marks=needs_layer(name)) for name in EXPERIMENTS]


def compose_cfg(*overrides: str, out=None):
    """The composed config (``out``: the run directory, instead of Hydra's)."""
    extra = [f"paths.output_dir={out}"] if out is not None else []
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[*overrides, *extra])


def run(out, *overrides: str) -> dict:
    """Train in-process into ``out``; return the summary (with the trainer and model)."""
    cfg = compose_cfg(*overrides, "trainer.enable_progress_bar=false", out=out)
    return train(cfg)


def stats_callback(summary: dict):
    from experiments.callbacks import SolverStatsLogger

    (cb,) = [c for c in summary["trainer"].callbacks if isinstance(c, SolverStatsLogger)]
    return cb
