"""pytest-benchmark cases for ``vae_loss`` with likelihood="continuous_bernoulli"."""

from benchmarks.harness import run_case


def test_vae_loss_continuous_bernoulli(benchmark, provider, size, dtype, mode):
    run_case(benchmark, "vae_loss_continuous_bernoulli", provider, size, dtype, mode)
