"""The benchmark of iiq: `python -m tests.bench.run` (see `run.py` and BENCHMARKS.md)."""
