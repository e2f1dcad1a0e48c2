"""vaekern: fused kernels for the VAE loss (negative ELBO) with a reference oracle.

Importing vaekern needs neither a GPU, nor Triton, nor the compiled extension. It
registers the backends this install has (``vaekern.backends``): the extension's kernels
where it is built, and Triton's launchers, which import triton on their first launch.
"""

from vaekern import backends, diagnostics, nn, reference
from vaekern.backends import BackendUnavailableError, available_backends
from vaekern.functional import (
    VAELossParts,
    bernoulli_nll,
    continuous_bernoulli_nll,
    gaussian_kl,
    gaussian_nll,
    reparameterize,
    vae_loss,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "VAELossParts",
    "available_backends",
    "backends",
    "bernoulli_nll",
    "continuous_bernoulli_nll",
    "diagnostics",
    "gaussian_kl",
    "gaussian_nll",
    "nn",
    "reference",
    "reparameterize",
    "vae_loss",
]
