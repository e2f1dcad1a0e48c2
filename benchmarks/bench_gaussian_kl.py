"""pytest-benchmark cases for ``gaussian_kl``: one per provider, size, dtype and mode (conftest.py)."""

from benchmarks.harness import run_case


def test_gaussian_kl(benchmark, provider, size, dtype, mode):
    run_case(benchmark, "gaussian_kl", provider, size, dtype, mode)
