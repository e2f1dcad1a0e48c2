"""``gaussian_kl``: schema, fake, and its two autograd paths.

Math (``vaekern.reference``), per latent element, with ``v = exp(min(lv, 60))``:
``kl = 0.5 * (mu^2 + v - 1 - lv)``, summed over each row and reduced over rows. With ``s``
the upstream gradient per row (times 1/B for ``mean``):
``d/dmu = s * mu`` and ``d/dlv = s * 0.5 * (v - 1)`` (the straight-through clamp).

Kernels: ``gaussian_kl(mu, logvar, reduction) -> loss`` and
``gaussian_kl_backward(grad_out, mu, logvar, reduction) -> (grad_mu, grad_logvar)``.

Autograd: both paths save mu and logvar (latent-sized) and call the backward kernel. A
backward that builds a graph (``create_graph=True``) evaluates the same two expressions
with differentiable PyTorch ops instead, so double backward works.
"""

from __future__ import annotations

import torch

from vaekern._ops._common import acc_dtype, below_autograd, kl_grads, loss_like, register_op

SCHEMAS = {
    "gaussian_kl": "(Tensor mu, Tensor logvar, int reduction) -> Tensor",
    "gaussian_kl_backward": "(Tensor grad_out, Tensor mu, Tensor logvar, int reduction) -> (Tensor, Tensor)",
}


def gaussian_kl_fake(mu, logvar, reduction):
    return loss_like(mu, reduction, acc_dtype(mu, logvar))


def gaussian_kl_backward_fake(grad_out, mu, logvar, reduction):
    return (
        torch.empty_like(mu, memory_format=torch.contiguous_format),
        torch.empty_like(logvar, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    mu, logvar, reduction = inputs
    ctx.reduction = reduction
    ctx.save_for_backward(mu, logvar)


def _traced_backward(kernels, ctx, grad_out):
    mu, logvar = ctx.saved_tensors
    return (*kl_grads(kernels, grad_out, mu, logvar, ctx.reduction), None)


class GaussianKLFunction(torch.autograd.Function):
    """The eager path: ``apply(kernels, mu, logvar, reduction) -> loss``."""

    @staticmethod
    def forward(ctx, kernels, mu, logvar, reduction):
        ctx.kernels, ctx.reduction = kernels, reduction
        ctx.save_for_backward(mu, logvar)
        with below_autograd():
            return kernels.gaussian_kl(mu, logvar, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        mu, logvar = ctx.saved_tensors
        return (None, *kl_grads(ctx.kernels, grad_out, mu, logvar, ctx.reduction), None)


def register(lib: torch.library.Library, kernels) -> None:
    """Define the schemas in ``lib``'s namespace, with their fakes and, unless the
    namespace has its own (the extension's, in C++), the autograd of both paths."""
    register_op(
        lib, kernels, SCHEMAS,
        {"gaussian_kl": gaussian_kl_fake, "gaussian_kl_backward": gaussian_kl_backward_fake},
        _setup_context, _traced_backward,
    )  # fmt: skip
