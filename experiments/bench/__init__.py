"""Benchmarks against peer libraries: ``python -m experiments.bench NAME [key=value ...]``.

Each benchmark is a module ``experiments/bench/NAME.py`` with ``main(cfg) -> list[dict]`` and
settings in ``configs/bench/NAME.yaml``. The harness writes ``results/NAME.json`` and
``results/NAME.md`` (rows with absolute times, ratios ours/theirs, and the machine).
"""
