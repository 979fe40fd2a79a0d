"""Config composition, instantiation, and rejection of unknown keys."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from experiments.config import TrainConfig, check_config
from experiments.train import CONFIGS
from tests.experiments.conftest import EXPERIMENTS, compose_cfg, experiment_params


def test_every_experiment_has_a_config_and_the_default_is_deq_digits():
    names = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
    assert set(EXPERIMENTS) <= set(names)
    assert compose_cfg().name == "deq_digits"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_composes_with_overrides(name, tmp_path):
    cfg = compose_cfg(f"experiment={name}", "seed=3", "trainer.max_epochs=2", out=tmp_path)
    assert cfg.name == name and cfg.seed == 3 and cfg.trainer.max_epochs == 2
    assert cfg.data.seed == 3  # interpolated
    assert cfg.paths.output_dir == str(tmp_path)
    assert cfg.targets, "every experiment declares its target metrics"
    for group in ("data", "model", "trainer"):
        assert cfg[group]._target_


@pytest.mark.parametrize("name", experiment_params())
def test_experiment_instantiates(name, tmp_path):
    cfg = compose_cfg(f"experiment={name}", out=tmp_path)
    check_config(cfg)
    data, model = instantiate(cfg.data), instantiate(cfg.model)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert data.__class__.__name__.endswith("DataModule")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_unknown_override_is_rejected():
    with pytest.raises(ConfigCompositionException, match="Could not override 'sede'"):
        compose_cfg("sede=1")
    with pytest.raises(ConfigCompositionException, match="lerning_rate"):
        compose_cfg("experiment=rootfind_eos", "model.lerning_rate=0.1")


def test_appended_unknown_keys_are_rejected_before_training(tmp_path):
    cfg = compose_cfg("experiment=rootfind_eos", "+sede=1", out=tmp_path)
    with pytest.raises(ValueError, match="unknown top-level config key.*sede"):
        check_config(cfg)
    cfg = compose_cfg("experiment=rootfind_eos", "+model.lerning_rate=0.1", out=tmp_path)
    with pytest.raises(ValueError, match=r"model\.lerning_rate.*EOSFit.*accepted: .*a_init"):
        check_config(cfg)
    cfg = compose_cfg("experiment=rootfind_eos", "+trainer.max_epoch=3", out=tmp_path)
    with pytest.raises(ValueError, match=r"trainer\.max_epoch\b"):
        check_config(cfg)


def test_unknown_key_in_a_yaml_file_is_rejected_by_the_schema():
    schema = OmegaConf.structured(TrainConfig)
    with pytest.raises(ConfigKeyError, match="sede"):
        OmegaConf.merge(schema, OmegaConf.create("sede: 1"))


def test_unimportable_target_is_named(tmp_path):
    cfg = compose_cfg("experiment=rootfind_eos", "model._target_=experiments.tasks.eos.Nope",
                      out=tmp_path)
    with pytest.raises(ValueError, match=r"config model: cannot import _target_ .*Nope"):
        check_config(cfg)


def test_the_slurm_launcher_config_runs_one_task_per_device():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer.devices=4",
                                          "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.nodes, launcher.partition) == (4, 2, "gpu")
    assert cfg.hydra.callbacks.sweep_summary._target_ == "experiments.sweep.SweepSummary"
