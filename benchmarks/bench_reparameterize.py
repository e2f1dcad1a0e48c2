"""pytest-benchmark cases for ``reparameterize``: one per provider, size, dtype and mode (conftest.py)."""

from benchmarks.harness import run_case


def test_reparameterize(benchmark, provider, size, dtype, mode):
    run_case(benchmark, "reparameterize", provider, size, dtype, mode)
