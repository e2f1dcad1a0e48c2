"""pytest-benchmark cases for ``continuous_bernoulli_nll``: one per provider, size, dtype and mode (conftest.py)."""

from benchmarks.harness import run_case


def test_continuous_bernoulli_nll(benchmark, provider, size, dtype, mode):
    run_case(benchmark, "continuous_bernoulli_nll", provider, size, dtype, mode)
