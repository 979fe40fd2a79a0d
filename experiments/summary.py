"""``summary.json`` of a run: the experiment, its final metrics, whether each target was met."""

from __future__ import annotations

import json
import operator
import platform
from pathlib import Path

import torch

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def parse_target(spec: str) -> tuple[str, float | str]:
    """``">= 0.97"`` → ``(">=", 0.97)``; the bound may also name another metric
    (``"<= ridgecv_test_loss"`` → ``("<=", "ridgecv_test_loss")``, a baseline of the same run);
    raises ``ValueError`` on anything else."""
    for op in (">=", "<=", ">", "<"):
        if spec.strip().startswith(op):
            bound = spec.strip()[len(op):].strip()
            try:
                return op, float(bound)
            except ValueError:
                if bound.isidentifier():
                    return op, bound
    raise ValueError(f"target {spec!r} must look like '>= 0.97', '<= 1e-3' or '<= other_metric'")


def evaluate_targets(metrics: dict[str, float], targets: dict[str, str]) -> dict[str, dict]:
    """For each ``metric: "OP bound"``, the value reached and whether it meets the bound (a
    bound that names a metric takes that metric's value)."""
    out = {}
    for name, spec in targets.items():
        op, bound = parse_target(spec)
        value = metrics.get(name)
        if isinstance(bound, str):
            bound = metrics.get(bound)
        out[name] = {"target": spec, "value": value, "bound": bound,
                     "met": value is not None and bound is not None and OPS[op](value, bound)}
    return out


def final_metrics(callback_metrics: dict) -> dict[str, float]:
    """The trainer's latest scalar metrics as plain floats, sorted by name."""
    return {k: float(v) for k, v in sorted(callback_metrics.items())
            if not isinstance(v, torch.Tensor) or v.numel() == 1}


def write_summary(out_dir: Path, experiment: str, metrics: dict[str, float],
                  targets: dict[str, str], **extra) -> Path:
    """Write ``out_dir/summary.json``; ``extra`` entries (times, seed, plots) go in as they are."""
    record = {
        "experiment": experiment,
        "metrics": metrics,
        "targets": evaluate_targets(metrics, targets),
        **extra,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    path = Path(out_dir) / "summary.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    return path
