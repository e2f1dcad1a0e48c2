"""pytest-benchmark cases for the e2e case: one training step of the pytorch/examples VAE at
batch 128, one per provider (e2e.py)."""

from benchmarks import e2e
from benchmarks.harness import run_e2e

PROVIDERS = e2e.PROVIDERS


def test_e2e(benchmark, provider):
    run_e2e(benchmark, provider)
