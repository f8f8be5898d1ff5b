"""Benchmarks of this project; run them as modules, e.g. `python -m bench.throughput`."""
