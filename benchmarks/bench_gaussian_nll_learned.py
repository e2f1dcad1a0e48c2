"""pytest-benchmark cases for ``gaussian_nll`` with a learned 0-d ``log_scale``: one per provider,
size, dtype and mode (conftest.py)."""

from benchmarks.harness import run_case


def test_gaussian_nll_learned(benchmark, provider, size, dtype, mode):
    run_case(benchmark, "gaussian_nll_learned", provider, size, dtype, mode)
