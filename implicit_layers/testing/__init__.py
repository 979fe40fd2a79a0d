"""Problem generators with known solutions, shared by the tests and the benchmarks."""
