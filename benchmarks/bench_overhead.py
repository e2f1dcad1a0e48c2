"""pytest-benchmark cases for the overhead case: ``vae_loss`` on 1x1 float32 tensors, one per
provider and mode (cases.py, "The overhead case")."""

import torch

from benchmarks import cases
from benchmarks.harness import run_case

PROVIDERS = cases.OVERHEAD_PROVIDERS
MODES = cases.OVERHEAD_MODES


def test_overhead(benchmark, provider, mode):
    run_case(benchmark, "vae_loss", provider, cases.Size.parse(cases.OVERHEAD_SIZE), torch.float32, mode)
