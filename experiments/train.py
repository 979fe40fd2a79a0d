"""``python -m experiments.train [experiment=NAME] [key=value ...] [-m]``: train one experiment.

Instantiates the data module, the model, the loggers, the callbacks and the trainer from the
composed config (``configs/train.yaml`` + ``configs/experiment/NAME.yaml``), fits, tests, and
writes ``summary.json`` and PNG plots into the Hydra run directory, which it prints. The run's
key lines also go to ``train.log`` there (Hydra's job logging). ``ckpt_path=.../last.ckpt``
resumes a killed run where it stopped. Under DDP (``trainer.strategy=ddp trainer.devices=N``)
every rank trains, the metrics are reduced across ranks, and rank 0 alone reports and writes.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from experiments.config import check_config, register
from experiments.distributed import export_job, rank_argv
from experiments.summary import final_metrics, write_summary

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # absolute: works however it's imported
register()
# Tiny in-memory datasets: worker processes would only add start-up time.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
log = logging.getLogger(__name__)


def report(message: str, *args, level: int = logging.INFO) -> None:
    """Log on rank 0 only (every process of a DDP run executes this module)."""
    if rank_zero_only.rank == 0:
        log.log(level, message, *args)


def train(cfg: DictConfig) -> dict:
    """Fit and test the configured experiment; return the summary written to ``summary.json``."""
    check_config(cfg)
    threads, environ = torch.get_num_threads(), dict(os.environ)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg)
    finally:  # leave the process as it was: a sweep runs its next job in it
        torch.set_num_threads(threads)
        if not distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)  # Lightning's launcher exports LOCAL_RANK, WORLD_SIZE, ...


def _train(cfg: DictConfig) -> dict:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    export_job(overrides, str(out))  # for the ranks a DDP launch starts (experiments.distributed)
    report("[%s] seed %s, run dir: %s", cfg.name, cfg.seed, out)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    loggers = [lg for lg in (instantiate(c) for c in cfg.logger.values()) if lg is not None]
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                          default_root_dir=str(out))

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    fit_s = time.perf_counter() - start
    report("[%s] fit: %d epochs, %d steps in %.1fs on %d process(es)", cfg.name,
           trainer.current_epoch, trainer.global_step, fit_s, trainer.world_size)
    metrics = final_metrics(trainer.callback_metrics)  # the last train/val values
    if cfg.test:
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update(final_metrics(trainer.callback_metrics))  # reduced across ranks
    total_s = time.perf_counter() - start
    summary = {"metrics": metrics, "trainer": trainer, "model": model, "path": None}
    if not trainer.is_global_zero:
        return summary

    path = write_summary(
        out, cfg.name, metrics, OmegaConf.to_container(cfg.targets),
        seed=cfg.seed, overrides=overrides, epochs=trainer.current_epoch,
        global_step=trainer.global_step, world_size=trainer.world_size, fit_seconds=fit_s,
        total_seconds=total_s, resumed_from=cfg.ckpt_path,
        plots=sorted(str(p) for p in out.glob("*.png")), run_dir=str(out),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    summary["path"] = str(path)
    results = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in cfg.targets)
    report("[%s] %s in %.1fs; run dir: %s\n  summary: %s\n  plots:   %s", cfg.name,
           results or "done", total_s, out, path, ", ".join(p.name for p in out.glob("*.png")) or "-")
    return summary


def clean_up_failed_run(out: Path) -> None:
    """Remove a failed run's directory if it holds only what Hydra wrote (its ``.hydra``
    config and ``*.log`` files); otherwise say where the partial output is."""
    if not out.is_dir() or rank_zero_only.rank != 0:
        return
    kept = sorted(p.name for p in out.iterdir() if p.name != ".hydra" and p.suffix != ".log")
    if kept:
        report("run failed; its partial output is in %s (%s)", out, ", ".join(kept),
               level=logging.ERROR)
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        if Path(handler.baseFilename).parent == out.resolve():  # train.log: close, detach
            root.removeHandler(handler)
            handler.close()
    shutil.rmtree(out, ignore_errors=True)
    report("run failed before writing any output; removed its directory %s", out,
           level=logging.ERROR)


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except BaseException:
        clean_up_failed_run(Path(HydraConfig.get().runtime.output_dir))
        raise
    metric = next(iter(cfg.targets), None)  # a sweeper optimizes the first target
    return summary["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    sys.argv = rank_argv(sys.argv)  # a DDP rank started by Lightning joins its job
    main()
