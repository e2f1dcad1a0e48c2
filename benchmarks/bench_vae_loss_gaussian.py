"""pytest-benchmark cases for ``vae_loss`` with likelihood="gaussian"."""

from benchmarks.harness import run_case


def test_vae_loss_gaussian(benchmark, provider, size, dtype, mode):
    run_case(benchmark, "vae_loss_gaussian", provider, size, dtype, mode)
