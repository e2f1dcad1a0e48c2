"""pytest-benchmark cases for ``gaussian_nll``: one per provider, size, dtype and mode (conftest.py)."""

from benchmarks.harness import run_case


def test_gaussian_nll(benchmark, provider, size, dtype, mode):
    run_case(benchmark, "gaussian_nll", provider, size, dtype, mode)
