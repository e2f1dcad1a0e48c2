"""``reparameterize``: schema, fake, and its two autograd paths.

Math: ``z = mu + exp(lv / 2) * eps``; ``d/dmu = g`` and ``d/dlv = g * 0.5 * exp(lv / 2) * eps``.

Kernels: ``reparameterize(mu, logvar, eps, seed) -> z`` and
``reparameterize_backward(grad_z, mu, logvar, eps, seed) -> (grad_mu, grad_logvar)``.
Exactly one of ``eps`` (given noise) and ``seed`` (a 1-element int64 tensor on the device
from which the kernel draws its own noise) is not None.

Autograd: both paths save mu, logvar and eps or the seed: the noise is regenerated in
backward, never saved. A backward that builds a graph (``create_graph=True``) evaluates
the gradients with differentiable PyTorch ops; the kernel's own noise is then recovered as
``reparameterize(0, 0, None, seed)``, which is eps exactly (exp(0) = 1). Under torch.func
(``transform_function``) that noise is drawn in the forward, as a second output, and saved.
"""

from __future__ import annotations

import torch

from vaekern._ops._common import acc_dtype, below_autograd, register_op, transform_function

SCHEMAS = {
    "reparameterize": "(Tensor mu, Tensor logvar, Tensor? eps, Tensor? seed) -> Tensor",
    "reparameterize_backward": "(Tensor grad_z, Tensor mu, Tensor logvar, Tensor? eps, Tensor? seed) -> (Tensor, Tensor)",
}


def reparameterize_fake(mu, logvar, eps, seed):
    return torch.empty_like(mu, memory_format=torch.contiguous_format)


def reparameterize_backward_fake(grad_z, mu, logvar, eps, seed):
    return (
        torch.empty_like(mu, memory_format=torch.contiguous_format),
        torch.empty_like(logvar, memory_format=torch.contiguous_format),
    )


def latent_grads(kernels, grad_z, mu, logvar, eps, seed):
    """The backward of both paths: the kernel, or the differentiable form for double backward."""
    if not torch.is_grad_enabled():
        return kernels.reparameterize_backward(grad_z, mu, logvar, eps, seed)
    # In the accumulation dtype, rounded once, as the kernels do: exp(lv / 2) of a float16
    # logvar is inf above 22.2 where the gradient is finite, and the kernel's float32 noise
    # is drawn in that dtype too (the noise depends on the element's index only), not in mu's.
    acc = acc_dtype(mu)
    if eps is None:
        zeros = torch.zeros(mu.shape, dtype=acc, device=mu.device)
        with below_autograd():
            eps = kernels.reparameterize(zeros, zeros, None, seed)
    g_lv = grad_z.to(acc) * 0.5 * torch.exp(0.5 * logvar.to(acc)) * eps.to(acc)
    return grad_z, g_lv.to(logvar.dtype)


def _setup_context(ctx, inputs, output):
    mu, logvar, eps, seed = inputs
    ctx.save_for_backward(mu, logvar, eps, seed)


def _traced_backward(kernels, ctx, grad_z):
    return (*latent_grads(kernels, grad_z, *ctx.saved_tensors), None, None)


def _transform_forward(kernels, mu, logvar, eps, seed):
    # Under torch.func the kernel's noise is drawn here, below every transform, and saved:
    # backward cannot call the op again (functorch refuses the extension's C++ autograd).
    z = kernels.reparameterize(mu, logvar, eps, seed)
    if eps is None:
        zeros = torch.zeros_like(mu)
        return z, kernels.reparameterize(zeros, zeros, None, seed)
    return z, mu.new_empty((0,))


def _transform_setup_context(ctx, inputs, output):
    mu, logvar, eps, seed = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(mu, logvar, output[1] if eps is None else eps)


def _transform_backward(kernels, ctx, grad_z, _):
    mu, logvar, eps = ctx.saved_tensors
    return (*latent_grads(kernels, grad_z, mu, logvar, eps, None), None, None)


class ReparameterizeFunction(torch.autograd.Function):
    """The eager path: ``apply(kernels, mu, logvar, eps, seed) -> z``."""

    @staticmethod
    def forward(ctx, kernels, mu, logvar, eps, seed):
        ctx.kernels = kernels
        ctx.save_for_backward(mu, logvar, eps, seed)
        with below_autograd():
            return kernels.reparameterize(mu, logvar, eps, seed)

    @staticmethod
    def backward(ctx, grad_z):
        return (None, *latent_grads(ctx.kernels, grad_z, *ctx.saved_tensors), None, None)


def register(lib: torch.library.Library, kernels) -> None:
    """Define the schemas in ``lib``'s namespace, with their fakes and, unless the
    namespace has its own (the extension's, in C++), the autograd of both paths."""
    transform = transform_function(
        "reparameterize", kernels, _transform_setup_context, _transform_backward, _transform_forward
    )
    register_op(
        lib, kernels, SCHEMAS,
        {"reparameterize": reparameterize_fake, "reparameterize_backward": reparameterize_backward_fake},
        _setup_context, _traced_backward, transform,
    )  # fmt: skip
