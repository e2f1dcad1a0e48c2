"""pytest-benchmark cases for ``bernoulli_nll``: one per provider, size, dtype and mode (conftest.py)."""

from benchmarks.harness import run_case


def test_bernoulli_nll(benchmark, provider, size, dtype, mode):
    run_case(benchmark, "bernoulli_nll", provider, size, dtype, mode)
