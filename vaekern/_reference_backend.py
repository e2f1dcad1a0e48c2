"""The reference backend: every schema of ``_ops.py`` implemented with plain PyTorch.

It evaluates ``vaekern.reference`` in float64 and casts the results to the schema's
dtypes, and writes the analytic gradients out explicitly (the fused backends compute the
same expressions). Tests compare these gradients against autograd through
``vaekern.reference``, so the formulas here are checked, not trusted.

It is an oracle, not a fast path: it materializes float64 copies, and ``reparameterize``
with an in-op seed reads the seed on the host (a device sync) to seed a
``torch.Generator``. Pass ``eps`` to avoid that.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vaekern import reference
from vaekern._ops import acc_dtype, row_scale

_NAME = {0: "none", 1: "mean", 2: "sum"}


def _reduced(rows: Tensor, reduction: int, dtype: torch.dtype) -> Tensor:
    return reference.reduce_rows(rows, _NAME[reduction]).to(dtype)


def _bernoulli_grad(input: Tensor, target: Tensor, from_logits: bool, reduction: int) -> Tensor:
    x = input.double()
    t = target.double()
    if from_logits:
        g = torch.sigmoid(x) - t
    else:
        # binary_cross_entropy's own gradient, finite at p = 0 and p = 1.
        g = (x - t) / (x * (1 - x)).clamp(min=1e-12)
    if reduction == 1:
        g = g / input.shape[0]
    return g.to(input.dtype).contiguous()


def bernoulli_nll(input, target, from_logits, reduction, compute_grad):
    rows = reference.bernoulli_nll_ref(input, target, from_logits=from_logits, reduction="none")
    out = _reduced(rows, reduction, acc_dtype(input))
    grad = _bernoulli_grad(input, target, from_logits, reduction) if compute_grad else input.new_empty((0,))
    return out, grad


def _scale_rows_(grad: Tensor, scale: Tensor) -> None:
    # scale is () or (B,); for "mean" the 1/B is already in grad.
    grad.mul_(scale.reshape((-1,) + (1,) * (grad.dim() - 1)) if scale.dim() else scale)


def bernoulli_nll_backward_(grad_input, grad_out):
    _scale_rows_(grad_input, grad_out)


def gaussian_kl(mu, logvar, reduction):
    rows = reference.gaussian_kl_ref(mu, logvar, reduction="none")
    return _reduced(rows, reduction, acc_dtype(mu, logvar))


def gaussian_kl_grads(grad_out: Tensor, mu: Tensor, logvar: Tensor, reduction: int):
    """(d/dmu, d/dlogvar) of the reduced KL times grad_out; differentiable, so double backward works."""
    s = row_scale(grad_out.double(), reduction, mu.shape[0], mu.dim())
    var = torch.exp(reference._clamped_logvar(logvar.double()))
    g_mu = s * mu.double()
    g_lv = s * 0.5 * (var - 1.0)
    return g_mu.to(mu.dtype).contiguous(), g_lv.to(logvar.dtype).contiguous()


def gaussian_kl_backward(grad_out, mu, logvar, reduction):
    return gaussian_kl_grads(grad_out, mu, logvar, reduction)


def _noise(mu: Tensor, eps: Tensor | None, seed: Tensor | None) -> Tensor:
    if eps is not None:
        return eps.double()
    gen = torch.Generator(device=mu.device)
    gen.manual_seed(int(seed.reshape(-1)[0]))  # host sync: acceptable in the oracle only
    return torch.randn(mu.shape, generator=gen, device=mu.device, dtype=torch.float32).double()


def reparameterize(mu, logvar, eps, seed):
    z = reference.reparameterize_ref(mu, logvar, _noise(mu, eps, seed))
    return z.to(mu.dtype).contiguous()


def reparameterize_backward(grad_z, mu, logvar, eps, seed):
    e = _noise(mu, eps, seed)
    g = grad_z.double()
    g_lv = g * 0.5 * torch.exp(0.5 * logvar.double()) * e
    return g.to(mu.dtype).contiguous().clone(), g_lv.to(logvar.dtype).contiguous()


def vae_loss(recon, target, mu, logvar, beta, from_logits, reduction, compute_grad):
    dt = acc_dtype(recon, mu, logvar)
    rec = reference.bernoulli_nll_ref(recon, target, from_logits=from_logits, reduction="none")
    kl = reference.gaussian_kl_ref(mu, logvar, reduction="none")
    rec = reference.reduce_rows(rec, _NAME[reduction])
    kl = reference.reduce_rows(kl, _NAME[reduction])
    loss = rec + beta.double() * kl
    grad = _bernoulli_grad(recon, target, from_logits, reduction) if compute_grad else recon.new_empty((0,))
    return loss.to(dt), rec.to(dt), kl.to(dt), grad


def vae_loss_backward_(grad_recon, grad_loss, grad_recon_term, grad_kl_term, mu, logvar, beta, reduction):
    if grad_recon.numel():
        _scale_rows_(grad_recon, grad_loss + grad_recon_term)
    return gaussian_kl_grads(grad_loss * beta + grad_kl_term, mu, logvar, reduction)


def register(lib: torch.library.Library) -> None:
    """Register every schema's implementation for the CPU and CUDA dispatch keys."""
    from vaekern._ops import SCHEMAS

    for name in SCHEMAS:
        for key in ("CPU", "CUDA"):
            lib.impl(name, globals()[name], key)
