"""``python -m experiments.bench NAME [key=value ...]``: run one benchmark and write its report."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from omegaconf import OmegaConf

from experiments.bench.harness import write_report

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "bench"


def main(argv: list[str] | None = None) -> None:
    available = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    parser = argparse.ArgumentParser(prog="python -m experiments.bench")
    parser.add_argument("name", choices=available, help="which benchmark")
    parser.add_argument("overrides", nargs="*", help="settings to override, as key=value")
    args = parser.parse_args(argv)
    cfg = OmegaConf.load(CONFIGS / f"{args.name}.yaml")
    OmegaConf.set_struct(cfg, True)  # an unknown key is an error, not silently ignored
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.overrides))
    module = importlib.import_module(f"experiments.bench.{args.name}")
    rows = module.main(cfg)
    write_report(args.name, rows, OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()
