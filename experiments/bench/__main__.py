"""``python -m experiments.bench NAME [key=value ...] [--out DIR]``: run one benchmark and
write its report (``outputs/bench/NAME.{json,md}`` by default)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from omegaconf import OmegaConf

from experiments.bench.harness import RESULTS, write_report

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "bench"


def main(argv: list[str] | None = None) -> None:
    available = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench",
        usage="%(prog)s {" + ",".join(available) + "} [key=value ...] [--out DIR]",
        description="Run one benchmark against its peers and write NAME.json and NAME.md.")
    parser.add_argument("name", choices=available, help="which benchmark (configs/bench/NAME.yaml)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="optional: settings of configs/bench/NAME.yaml to override")
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR",
                        help=f"where the report goes (default: {RESULTS}, ignored by git)")
    args = parser.parse_args(argv)
    cfg = OmegaConf.load(CONFIGS / f"{args.name}.yaml")
    OmegaConf.set_struct(cfg, True)  # an unknown key is an error, not silently ignored
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.overrides))
    module = importlib.import_module(f"experiments.bench.{args.name}")
    rows = module.main(cfg)
    write_report(args.name, rows, OmegaConf.to_container(cfg, resolve=True), out_dir=args.out)


if __name__ == "__main__":
    main()
