"""The Triton backend: registers the ``vaekern_triton`` kernels when imported.

Every schema of ``vaekern._ops`` gets its launcher for the CUDA dispatch key, and for
the CPU key too when ``TRITON_INTERPRET=1`` (Triton's interpreter runs the same kernels
on CPU tensors; that is how this backend is tested without a GPU). The schemas, fakes
and autograd live in ``_ops.py`` and are shared with the other backends.

One op per module, each with its math, dtypes and limits in its header:
``bernoulli_nll.py``, ``gaussian_kl.py``, ``reparameterize.py``, ``vae_loss.py``;
``_common.py`` holds the shared element math and the deterministic partials reduction.
"""

from __future__ import annotations

import torch

from vaekern import _ops  # noqa: F401  (defines the vaekern_triton schemas)
from vaekern._backends import triton_interpreted
from vaekern._triton.bernoulli_nll import bernoulli_nll, bernoulli_nll_backward_
from vaekern._triton.gaussian_kl import gaussian_kl, gaussian_kl_backward
from vaekern._triton.reparameterize import reparameterize, reparameterize_backward
from vaekern._triton.vae_loss import vae_loss, vae_loss_backward_

IMPLS = {
    "bernoulli_nll": bernoulli_nll,
    "bernoulli_nll_backward_": bernoulli_nll_backward_,
    "gaussian_kl": gaussian_kl,
    "gaussian_kl_backward": gaussian_kl_backward,
    "reparameterize": reparameterize,
    "reparameterize_backward": reparameterize_backward,
    "vae_loss": vae_loss,
    "vae_loss_backward_": vae_loss_backward_,
}

DISPATCH_KEYS = ("CUDA", "CPU") if triton_interpreted() else ("CUDA",)

_lib = torch.library.Library("vaekern_triton", "IMPL")
for _name, _fn in IMPLS.items():
    for _key in DISPATCH_KEYS:
        _lib.impl(_name, _fn, _key)
