"""``python -m experiments.train [experiment=NAME] [key=value ...] [-m]``: train one experiment.

Instantiates the data module, the model, the loggers, the callbacks and the trainer from the
composed config (``configs/train.yaml`` + ``configs/experiment/NAME.yaml``), fits, tests, and
writes ``summary.json`` and PNG plots into the Hydra run directory, which it prints.
``ckpt_path=.../checkpoints/last.ckpt`` resumes a killed run where it stopped.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.config import check_config, register
from experiments.summary import final_metrics, write_summary

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # absolute: works however it's imported
register()
# Tiny in-memory datasets: worker processes would only add start-up time.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def train(cfg: DictConfig) -> dict:
    """Fit and test the configured experiment; return the summary written to ``summary.json``."""
    check_config(cfg)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: DictConfig) -> dict:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    loggers = [lg for lg in (instantiate(c) for c in cfg.logger.values()) if lg is not None]
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                          default_root_dir=str(out))

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    fit_s = time.perf_counter() - start
    metrics = final_metrics(trainer.callback_metrics)  # the last train/val values
    if cfg.test:
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update(final_metrics(trainer.callback_metrics))
    total_s = time.perf_counter() - start

    path = write_summary(
        out, cfg.name, metrics, OmegaConf.to_container(cfg.targets),
        seed=cfg.seed, epochs=trainer.current_epoch, global_step=trainer.global_step,
        fit_seconds=fit_s, total_seconds=total_s, resumed_from=cfg.ckpt_path,
        plots=sorted(str(p) for p in out.glob("*.png")), run_dir=str(out),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    summary = {"path": str(path), "metrics": metrics, "trainer": trainer, "model": model}
    report = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in cfg.targets)
    print(f"[{cfg.name}] {report or 'done'} in {total_s:.1f}s; run dir: {out}\n"
          f"  summary: {path}\n  plots:   {', '.join(p.name for p in out.glob('*.png')) or '-'}")
    return summary


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = train(cfg)
    metric = next(iter(cfg.targets), None)  # a sweeper optimizes the first target
    return summary["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    main()
