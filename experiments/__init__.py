"""Config-driven experiments and benchmarks built on the public implicit_layers API."""
