"""pytest-benchmark cases for ``gaussian_kl`` with a learned prior and free bits (cases.FREE_BITS)."""

from benchmarks.harness import run_case


def test_gaussian_kl_free_bits(benchmark, provider, size, dtype, mode):
    run_case(benchmark, "gaussian_kl_free_bits", provider, size, dtype, mode)
