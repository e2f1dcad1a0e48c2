"""The vaekern benchmark suite: ``python -m benchmarks`` (run.py) and ``pytest benchmarks``."""
