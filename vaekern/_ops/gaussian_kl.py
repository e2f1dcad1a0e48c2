"""``gaussian_kl``: schema, fake, and its two autograd paths.

Math (``vaekern.reference``), per latent element, to the prior N(pm, exp(plv)) (each
absent prior is 0): with ``m = (mu - pm) * exp(-plv / 2)``, ``l = lv - plv`` and
``v = exp(min(l, 60))``, ``kl = 0.5 * (m^2 + v - 1 - l)``, summed over each row and reduced
over rows (the KL is invariant under the affine map that takes the prior to N(0, I), so
the kernels evaluate the standard KL of (m, l), formed on load). With ``s`` the upstream
gradient per row (times 1/B for ``mean``), ``g_m = s * m`` and
``g_l = s * 0.5 * (v - 1)`` (the straight-through clamp):

* ``d/dmu = g_m * exp(-plv / 2)``, ``d/dlv = g_l``;
* ``d/dpm = -d/dmu``, ``d/dplv = -g_l - 0.5 * g_m * m``, per element; each prior's is
  summed over the dims it broadcasts (``reduced_prior_grads``, one ATen op).

Reductions: none, mean and sum over rows (``REDUCTIONS``), and ``KL_COLUMNS``: the KL of each
latent element summed over the rows, shape ``mu.shape[1:]`` (free bits and the per-element
KL), whose backward takes one upstream gradient per element (``s`` per column, not per row).

Kernels: ``gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction) -> loss`` and
``gaussian_kl_backward(grad_out, mu, logvar, prior_mu, prior_logvar, reduction) ->
(grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar)``, the last two per element
(mu's shape, the prior's dtype), or ``(0,)`` for an absent prior. A prior broadcasts to
``mu`` and has the kernels' math dtype (float64 if mu is, else float32; the caller,
``vaekern.functional``, casts it); the kernels read it in place at its broadcast strides.

Autograd: both paths save the four inputs (latent-sized, or smaller) and call the backward
kernel. A backward that builds a graph (``create_graph=True``) evaluates the same
expressions with differentiable PyTorch ops instead, so double backward works.
"""

from __future__ import annotations

import torch

from vaekern._ops._common import (
    KL_COLUMNS,
    acc_dtype,
    below_autograd,
    kl_grads,
    loss_like,
    prior_grad_like,
    register_op,
)

SCHEMAS = {
    "gaussian_kl": "(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, int reduction) -> Tensor",
    "gaussian_kl_backward": "(Tensor grad_out, Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, int reduction) -> (Tensor, Tensor, Tensor, Tensor)",
}


def gaussian_kl_fake(mu, logvar, prior_mu, prior_logvar, reduction):
    if reduction == KL_COLUMNS:
        return mu.new_empty(mu.shape[1:], dtype=acc_dtype(mu, logvar))
    return loss_like(mu, reduction, acc_dtype(mu, logvar))


def gaussian_kl_backward_fake(grad_out, mu, logvar, prior_mu, prior_logvar, reduction):
    return (
        torch.empty_like(mu, memory_format=torch.contiguous_format),
        torch.empty_like(logvar, memory_format=torch.contiguous_format),
        prior_grad_like(prior_mu, mu),
        prior_grad_like(prior_logvar, mu),
    )


def _setup_context(ctx, inputs, output):
    mu, logvar, prior_mu, prior_logvar, reduction = inputs
    ctx.reduction = reduction
    ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar)


def _traced_backward(kernels, ctx, grad_out):
    return (*kl_grads(kernels, grad_out, *ctx.saved_tensors, ctx.reduction, ctx.needs_input_grad[2:4]), None)


class GaussianKLFunction(torch.autograd.Function):
    """The eager path: ``apply(kernels, mu, logvar, prior_mu, prior_logvar, reduction) -> loss``."""

    @staticmethod
    def forward(ctx, kernels, mu, logvar, prior_mu, prior_logvar, reduction):
        ctx.kernels, ctx.reduction = kernels, reduction
        ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar)
        with below_autograd():
            return kernels.gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        grads = kl_grads(ctx.kernels, grad_out, *ctx.saved_tensors, ctx.reduction, ctx.needs_input_grad[3:5])
        return (None, *grads, None)


def register(lib: torch.library.Library, kernels) -> None:
    """Define the schemas in ``lib``'s namespace, with their fakes and, unless the
    namespace has its own (the extension's, in C++), the autograd of both paths."""
    register_op(
        lib, kernels, SCHEMAS,
        {"gaussian_kl": gaussian_kl_fake, "gaussian_kl_backward": gaussian_kl_backward_fake},
        _setup_context, _traced_backward,
    )  # fmt: skip
