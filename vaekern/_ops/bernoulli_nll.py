"""``bernoulli_nll``: schema, fake, and its two autograd paths.

Math (``vaekern.reference``): per row b, ``nll_b = sum_d l(x_bd, t_bd)`` with the softplus
form for logits or the -100-clamped logs for probabilities, then reduced over rows.

Kernels (one namespace per backend, see ``vaekern.backends``):

* ``bernoulli_nll(input, target, from_logits, reduction, compute_grad) -> (loss, grad)``
  returns, next to the loss, ``grad = d(reduced loss)/d(input)`` for an upstream gradient of
  1 (for ``mean`` the 1/B is folded in), contiguous in input's dtype; ``(0,)`` when
  ``compute_grad`` is False.
* ``bernoulli_nll_backward_(grad, grad_out, input, target, from_logits, reduction)`` scales
  ``grad`` in place per row by ``grad_out`` (() or (B,)), and leaves every row whose scale
  is exactly 1 untouched. Where a float16 ``grad`` is outside float16's normal range, the
  element is recomputed from ``input`` and ``target`` in float32 with the upstream applied
  before the rounding: the forward's value for an upstream of 1 (1/B folded in for mean)
  overflows to inf where a loss weight below 1 brings it back into range (and a zero weight
  must give 0, not NaN), and is a subnormal with lost bits where a GradScaler's scale would
  have kept them.

Autograd, two paths over the same kernels:

* eager (:class:`BernoulliNLLFunction`): backward scales the forward's gradient in place,
  so the usual ``loss.backward()`` moves no image-sized bytes. Saved: the gradient
  (handed to the first backward, see ``take_saved_grad``) and the inputs, by reference,
  for a second backward to recompute it. No host sync decides anything.
* traced (registered with ``torch.library.register_autograd``, used under
  ``torch.compile`` and by ``opcheck``): the same gradient is an op output, saved and
  scaled out of place, which Inductor fuses.

* torch.func (``transform_function``): the traced path's formula in a Function that
  functorch accepts.

Double backward through any path raises: the saved gradient has no graph. Under torch.func,
whose ``grad`` always builds a graph, the first order goes through and the error comes
where a second order is taken (``first_order_only``).
"""

from __future__ import annotations

import torch

from vaekern._ops._common import (
    acc_dtype,
    below_autograd,
    first_order_only,
    grad_like,
    loss_like,
    no_double_backward,
    register_op,
    scaled_rows,
    take_saved_grad,
)

SCHEMAS = {
    "bernoulli_nll": "(Tensor input, Tensor target, bool from_logits, int reduction, bool compute_grad) -> (Tensor, Tensor)",
    "bernoulli_nll_backward_": "(Tensor(a!) grad_input, Tensor grad_out, Tensor input, Tensor target, bool from_logits, int reduction) -> ()",
}


def bernoulli_nll_fake(input, target, from_logits, reduction, compute_grad):
    return loss_like(input, reduction, acc_dtype(input)), grad_like(input, compute_grad)


def bernoulli_nll_backward_fake(grad_input, grad_out, input, target, from_logits, reduction):
    return None


def _setup_context(ctx, inputs, output):
    input, target, from_logits, reduction, compute_grad = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.args = (from_logits, reduction)
    ctx.save_for_backward(input, target, output[1])


def _traced_backward(kernels, ctx, grad_out, _):
    """Also the backward of the torch.func path (``transform_function``)."""
    if grad_out is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    input, target, grad = ctx.saved_tensors
    if grad.numel() != input.numel():  # the forward was asked for no gradient
        with below_autograd():
            grad = kernels.bernoulli_nll(input, target, *ctx.args, True)[1]
    grad = scaled_rows(kernels, first_order_only(grad, input, "bernoulli_nll"), grad_out, input, target, *ctx.args)
    return grad, None, None, None, None


class BernoulliNLLFunction(torch.autograd.Function):
    """The eager path: ``apply(kernels, input, target, from_logits, reduction) -> loss``."""

    @staticmethod
    def forward(ctx, kernels, input, target, from_logits, reduction):
        with below_autograd():
            loss, grad = kernels.bernoulli_nll(input, target, from_logits, reduction, True)
        ctx.kernels, ctx.args, ctx.saved_grad = kernels, (from_logits, reduction), grad
        ctx.save_for_backward(input, target)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        no_double_backward("bernoulli_nll")
        input, target = ctx.saved_tensors
        grad = take_saved_grad(ctx)
        if grad is None:  # a second backward through the same graph
            grad = ctx.kernels.bernoulli_nll(input, target, *ctx.args, True)[1]
        ctx.kernels.bernoulli_nll_backward_(grad, grad_out, input, target, *ctx.args)
        return None, grad, None, None, None


def register(lib: torch.library.Library, kernels) -> None:
    """Define the schemas in ``lib``'s namespace, with their fakes and, unless the
    namespace has its own (the extension's, in C++), the autograd of both paths."""
    register_op(
        lib, kernels, SCHEMAS,
        {"bernoulli_nll": bernoulli_nll_fake, "bernoulli_nll_backward_": bernoulli_nll_backward_fake},
        _setup_context, _traced_backward,
    )  # fmt: skip
