"""vaekern: fused kernels for the VAE loss (negative ELBO) with a reference oracle.

Importing vaekern needs neither a GPU, nor Triton, nor the compiled extension: backends
are loaded the first time a call asks for them.
"""

from vaekern import nn, reference
from vaekern._backends import BackendUnavailableError, available_backends
from vaekern.functional import VAELossParts, bernoulli_nll, gaussian_kl, reparameterize, vae_loss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "VAELossParts",
    "available_backends",
    "bernoulli_nll",
    "gaussian_kl",
    "nn",
    "reference",
    "reparameterize",
    "vae_loss",
]
