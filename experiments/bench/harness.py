"""Timing, memory and reporting helpers shared by the benchmarks."""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from experiments.tables import markdown_table
from implicit_layers.testing.memory import saved_tensor_bytes  # noqa: F401 (re-exported for the benchmarks)

# fresh results, relative to the working directory and ignored by git (outputs/); the results
# quoted in the README are kept apart, in experiments/bench/reference/
RESULTS = Path("outputs") / "bench"


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    return info


def _sync(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1, device=None) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_peak_bytes(fn: Callable[[], object]) -> int | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def ratio(ours: float, theirs: float | None) -> float | None:
    if theirs is None or theirs == 0 or math.isnan(theirs):
        return None
    return ours / theirs


def write_report(name: str, rows: list[dict], settings: dict, out_dir: Path = RESULTS) -> Path:
    """Write ``NAME.json`` and ``NAME.md`` and print the table; return the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    record = {"benchmark": name, "machine": machine, "settings": settings, "rows": rows,
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    table = markdown_table(rows)
    md = (f"# Benchmark `{name}`\n\nMachine: {machine.get('cpu_model') or machine['processor']}, "
          f"{machine['cpu_count']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), CUDA: {machine['cuda']}\n\n"
          f"Settings: `{json.dumps(settings, default=str)}`\n\n{table}\n")
    path = out_dir / f"{name}.md"
    path.write_text(md)
    print(md)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return path


def steady_malloc() -> bool:
    """glibc: no trimming of the heap and no fresh mmap per large block; False where that
    cannot be set. By default glibc maps each large temporary afresh (or trims the heap back)
    on every call, and the page faults of touching it again swung single timings by up to 2×
    with the order the methods ran in. Benchmarks apply it to every method alike."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # noqa: N806 (glibc's names)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def interleaved_medians(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median wall time in seconds of each call, timed in ``rounds`` interleaved rounds (each
    round calls every method once, after one warm-up round), so that drifts of the machine's
    speed fall on all methods alike."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(rounds + 1):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
