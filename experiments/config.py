"""The schema of ``configs/train.yaml`` and the check that rejects unknown keys.

Two layers of protection against a silently ignored key (a typo in a YAML file or on the
command line):

* the top level is a structured config (:class:`TrainConfig`, registered as ``train_schema``),
  so an unknown top-level key fails while Hydra composes the config;
* ``+key=value`` appends are checked against the schema too (:func:`check_config`);
* every node with a ``_target_`` is checked against the signature of what it builds
  (:func:`check_targets`) before anything is instantiated, so ``model.lerning_rate`` fails
  with the list of accepted keys instead of a late ``TypeError`` (or nothing at all).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf


@dataclass
class PathsConfig:
    root: str = "outputs"  # where run directories are created (``paths.root=...`` moves them)
    output_dir: str = "${hydra:runtime.output_dir}"  # this run's directory


@dataclass
class TrainConfig:
    name: str = MISSING  # the experiment's name, written to summary.json
    seed: int = 0
    threads: int | None = 1  # torch intra-op CPU threads for this run (None: torch's default)
    ckpt_path: str | None = None  # resume a killed run from this checkpoint
    test: bool = True  # run the test loop after fitting
    targets: dict[str, str] = field(default_factory=dict)  # metric -> ">= 0.97" (recorded)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: Any = MISSING
    model: Any = MISSING
    trainer: Any = MISSING
    logger: Any = field(default_factory=dict)
    callbacks: Any = field(default_factory=dict)


def register() -> None:
    """Store the schema and the ``train_config_groups`` resolver that ``--help`` uses."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    OmegaConf.register_new_resolver("train_config_groups", train_config_groups, replace=True)


def train_config_groups() -> str:
    """``group: option, ...`` for each config group that ``train`` composes: the groups of
    the schema and ``experiment`` (``configs/bench`` holds the benchmarks' settings instead)."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    groups = sorted({f.name for f in fields(TrainConfig)} | {"experiment"})
    return "".join(f"{g}: {', '.join(sorted(p.stem for p in (configs / g).glob('*.yaml')))}\n"
                   for g in groups if (configs / g).is_dir())


def check_config(cfg: DictConfig) -> None:
    """Reject top-level keys outside :class:`TrainConfig` (Hydra lets ``+key=value`` append
    them) and unknown keys of every ``_target_`` node; raises ``ValueError`` naming the key."""
    known = {f.name for f in fields(TrainConfig)} | {"hydra"}
    unknown = sorted(str(k) for k in cfg if k not in known)
    if unknown:
        raise ValueError(f"unknown top-level config key(s) {', '.join(unknown)} "
                         f"(accepted: {', '.join(sorted(known - {'hydra'}))})")
    check_targets(cfg)


def check_targets(cfg: DictConfig | ListConfig, where: str = "") -> None:
    """Raise ``ValueError`` naming the key when a ``_target_`` node has a key that its target
    does not accept (targets taking ``**kwargs`` accept everything)."""
    if isinstance(cfg, ListConfig):
        for i, item in enumerate(cfg):
            if isinstance(item, (DictConfig, ListConfig)):
                check_targets(item, f"{where}[{i}]")
        return
    target = cfg.get("_target_") if "_target_" in cfg else None
    if target is not None:
        _check_node(cfg, str(target), where)
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, (DictConfig, ListConfig)) and not node._is_none():
            check_targets(node, f"{where}.{key}" if where else str(key))


def _check_node(cfg: DictConfig, target: str, where: str) -> None:
    try:
        obj = get_object(target)
    except Exception as err:  # hydra wraps import errors in several types
        raise ValueError(f"config {where or '<root>'}: cannot import _target_ {target!r}: {err}") from err
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}
    unknown = [k for k in cfg if not str(k).startswith("_") and k not in accepted]
    if unknown:
        keys = ", ".join(f"{where}.{k}" if where else str(k) for k in unknown)
        raise ValueError(
            f"unknown config key(s) {keys}: not a parameter of {target} "
            f"(accepted: {', '.join(sorted(accepted))})"
        )
