"""Benchmarks against peer libraries: ``python -m experiments.bench NAME [key=value ...]``.

Each benchmark is a module ``experiments/bench/NAME.py`` with ``main(cfg) -> list[dict]`` and
settings in ``configs/bench/NAME.yaml``. The harness writes ``outputs/bench/NAME.json`` and
``outputs/bench/NAME.md`` (rows with absolute times, ratios ours/theirs, and the machine),
relative to the working directory and ignored by git; ``--out DIR`` writes elsewhere. The
reference results that the README quotes live in ``experiments/bench/reference/``.
"""
