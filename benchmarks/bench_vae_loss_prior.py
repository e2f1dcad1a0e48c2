"""pytest-benchmark cases for ``vae_loss`` with a learned per-latent prior."""

from benchmarks.harness import run_case


def test_vae_loss_prior(benchmark, provider, size, dtype, mode):
    run_case(benchmark, "vae_loss_prior", provider, size, dtype, mode)
