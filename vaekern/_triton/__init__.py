"""The Triton backend: the ``vaekern_triton`` namespace's launchers.

One op per module, each with its math, dtypes and limits in its header:
``bernoulli_nll.py``, ``gaussian_nll.py``, ``continuous_bernoulli_nll.py``, ``gaussian_kl.py``,
``reparameterize.py``, ``vae_loss.py``;
``_common.py`` holds the shared element math, tiling and the deterministic reduction.

Importing this package imports no Triton: :func:`register_launchers` binds each kernel op
to a launcher that imports its module on the first launch. ``vaekern.backends`` calls it
when vaekern is imported, so the kernels are registered before any trace (which runs the
fakes of ``vaekern._ops``, never a launcher), and a CPU-only user who never launches a
Triton kernel never pays for importing triton.
"""

from __future__ import annotations

import importlib

import torch

NAMESPACE = "vaekern_triton"

# kernel op -> the module that launches it
MODULES = {
    "bernoulli_nll": "bernoulli_nll",
    "bernoulli_nll_backward_": "bernoulli_nll",
    "continuous_bernoulli_nll": "continuous_bernoulli_nll",
    "continuous_bernoulli_nll_backward_": "continuous_bernoulli_nll",
    "gaussian_nll": "gaussian_nll",
    "gaussian_nll_backward_": "gaussian_nll",
    "gaussian_kl": "gaussian_kl",
    "gaussian_kl_backward": "gaussian_kl",
    "reparameterize": "reparameterize",
    "reparameterize_backward": "reparameterize",
    "vae_loss": "vae_loss",
    "vae_loss_backward_": "vae_loss",
}

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_LAUNCHERS = {}


def _launcher(name: str):
    def launch(*args):
        fn = _LAUNCHERS.get(name)
        if fn is None:
            fn = _LAUNCHERS[name] = getattr(importlib.import_module(f"{__name__}.{MODULES[name]}"), name)
        return fn(*args)

    launch.__name__ = name
    return launch


def register_launchers(device_types: tuple[str, ...]) -> None:
    """Register every kernel op's launcher for the dispatch keys of ``device_types``."""
    for name in MODULES:
        for device_type in device_types:
            _LIB.impl(name, _launcher(name), {"cuda": "CUDA", "cpu": "CPU"}[device_type])
