"""Benchmarks and the soak test (`python -m tools.bench.X`)."""
