"""pytest-benchmark cases for ``vae_loss``: one per provider, size, dtype and mode (conftest.py)."""

from benchmarks.harness import run_case


def test_vae_loss(benchmark, provider, size, dtype, mode):
    run_case(benchmark, "vae_loss", provider, size, dtype, mode)
