"""pytest-benchmark cases for ``vae_loss`` with a learned prior and free bits (cases.FREE_BITS)."""

from benchmarks.harness import run_case


def test_vae_loss_prior_free_bits(benchmark, provider, size, dtype, mode):
    run_case(benchmark, "vae_loss_prior_free_bits", provider, size, dtype, mode)
