"""pytest-benchmark cases for ``gaussian_nll`` with ``log_scale="optimal"``: one per provider,
size, dtype and mode (conftest.py)."""

from benchmarks.harness import run_case


def test_gaussian_nll_optimal(benchmark, provider, size, dtype, mode):
    run_case(benchmark, "gaussian_nll_optimal", provider, size, dtype, mode)
