"""What every likelihood op shares: its two kernel schemas, fakes, both autograd paths and
its torch.func Function, built once by :class:`LikelihoodOp` from the likelihood's name and
its one argument of its own (``bool from_logits`` or ``Tensor log_scale``).

Kernels of a likelihood ``<name>`` (one namespace per backend, see ``vaekern.backends``):

* ``<name>(input, target, param, reduction, compute_grad) -> (loss, grad)`` returns, next
  to the loss, ``grad = d(reduced loss)/d(input)`` for an upstream gradient of 1 (for
  ``mean`` the 1/B is folded in), contiguous in input's dtype; ``(0,)`` when
  ``compute_grad`` is False.
* ``<name>_backward_(grad, grad_out, input, target, param, reduction)`` scales ``grad``
  in place per row by ``grad_out`` (() or (B,)), and leaves every row whose scale is
  exactly 1 untouched. Where a float16 ``grad`` is outside float16's normal range, the
  element is recomputed from ``input`` and ``target`` in float32 with the upstream applied
  before the rounding: the forward's value for an upstream of 1 (1/B folded in for mean)
  overflows to inf where a loss weight below 1 brings it back into range (and a zero
  weight must give 0, not NaN), and is a subnormal with lost bits where a GradScaler's
  scale would have kept them.

Autograd, two paths over the same kernels:

* eager (``LikelihoodOp.Function``): backward scales the forward's gradient in place, so
  the usual ``loss.backward()`` moves no image-sized bytes. Saved: the gradient (handed to
  the first backward, see ``take_saved_grad``), and the inputs and a tensor param by
  reference, for a second backward to recompute the gradient and for the float16
  recompute. No host sync decides anything.
* traced (registered with ``torch.library.register_autograd``, used under
  ``torch.compile`` and by ``opcheck``): the same gradient is an op output, saved and
  scaled out of place, which Inductor fuses (float16: by the backward kernel on a copy).
* torch.func (``transform_function``): the traced path's formula in a Function that
  functorch accepts.

A tensor param that requires grad (the Gaussian's learned ``log_scale``) gets its
gradient from the likelihood's ``param_grad`` formula, in differentiable PyTorch ops, on
every path: for one learned scale from the op's loss alone (saved only then:
``loss_read_by_backward``), for a scale per column with one more pass over input and
target. Second order through the scale works where the input needs no gradient; double
backward through the input raises: the saved gradient has no graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vaekern._ops._common import (
    acc_dtype,
    below_autograd,
    first_order_only,
    grad_like,
    loss_like,
    loss_read_by_backward,
    no_double_backward,
    register_op,
    scaled_rows,
    take_saved_grad,
)

# (grad_out, input, target, param, reduction, the op's loss) -> d(grad_out . reduced loss)/d(param)
ParamGrad = Callable[[Tensor, Tensor, Tensor, Tensor, int, Tensor], Tensor]


class LikelihoodOp:
    """The op of one likelihood term: ``SCHEMAS``, ``register(lib, kernels)`` and the eager
    ``Function`` (``apply(kernels, input, target, param, reduction) -> loss``)."""

    def __init__(self, name: str, param: str, param_grad: ParamGrad | None = None) -> None:
        self.name = name
        self.backward_name = f"{name}_backward_"
        self.SCHEMAS = {
            name: f"(Tensor input, Tensor target, {param}, int reduction, bool compute_grad) -> (Tensor, Tensor)",
            self.backward_name: f"(Tensor(a!) grad_input, Tensor grad_out, Tensor input, Tensor target, {param}, int reduction) -> ()",
        }
        self.param_grad = param_grad
        self.Function = self._eager_function()

    # ---- fakes and the traced path ---------------------------------------------------------

    @staticmethod
    def _fake(input, target, param, reduction, compute_grad):
        return loss_like(input, reduction, acc_dtype(input)), grad_like(input, compute_grad)

    @staticmethod
    def _backward_fake(grad_input, grad_out, input, target, param, reduction):
        return None

    def _setup_context(self, ctx, inputs, output):
        input, target, param, reduction, compute_grad = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.reduction = reduction
        if isinstance(param, Tensor):
            ctx.save_for_backward(input, target, output[1], param, loss_read_by_backward(param, output[0]))
        else:
            ctx.param = param
            ctx.save_for_backward(input, target, output[1])

    def _traced_backward(self, kernels, ctx, grad_out, _):
        """Also the backward of the torch.func path (``transform_function``)."""
        if grad_out is None:
            return None, None, None, None, None
        input, target, grad, *saved_param = ctx.saved_tensors
        param, loss = saved_param if saved_param else (ctx.param, None)
        g_input = g_param = None
        if ctx.needs_input_grad[0]:
            if grad.numel() != input.numel():  # the forward was asked for no gradient
                with below_autograd():
                    grad = getattr(kernels, self.name)(input, target, param, ctx.reduction, True)[1]
            g_input = scaled_rows(
                getattr(kernels, self.backward_name), first_order_only(grad, input, self.name), grad_out,
                input, target, param, ctx.reduction,
            )  # fmt: skip
        if self.param_grad is not None and ctx.needs_input_grad[2]:
            g_param = self.param_grad(grad_out, input, target, param, ctx.reduction, loss)
        return g_input, None, g_param, None, None

    def register(self, lib: torch.library.Library, kernels) -> None:
        """Define the schemas in ``lib``'s namespace, with their fakes and, unless the
        namespace has its own (the extension's, in C++), the autograd of both paths."""
        register_op(
            lib, kernels, self.SCHEMAS, {self.name: self._fake, self.backward_name: self._backward_fake},
            self._setup_context, self._traced_backward,
        )  # fmt: skip

    # ---- the eager path --------------------------------------------------------------------

    def _eager_function(self) -> type[torch.autograd.Function]:
        op = self

        def forward(ctx, kernels, input, target, param, reduction):
            with below_autograd():
                loss, grad = getattr(kernels, op.name)(input, target, param, reduction, input.requires_grad)
            ctx.kernels, ctx.reduction, ctx.saved_grad = kernels, reduction, grad
            ctx.set_materialize_grads(False)
            if isinstance(param, Tensor):
                ctx.save_for_backward(input, target, param, loss_read_by_backward(param, loss))
            else:
                ctx.param = param
                ctx.save_for_backward(input, target)
            return loss

        def backward(ctx, grad_out):
            if grad_out is None:
                return None, None, None, None, None
            if ctx.needs_input_grad[1]:
                no_double_backward(op.name)
            input, target, *saved_param = ctx.saved_tensors
            param, loss = saved_param if saved_param else (ctx.param, None)
            g_input = g_param = None
            if ctx.needs_input_grad[1]:
                g_input = take_saved_grad(ctx)
                if g_input is None:  # a second backward through the same graph
                    g_input = getattr(ctx.kernels, op.name)(input, target, param, ctx.reduction, True)[1]
                getattr(ctx.kernels, op.backward_name)(g_input, grad_out, input, target, param, ctx.reduction)
            if op.param_grad is not None and ctx.needs_input_grad[3]:
                g_param = op.param_grad(grad_out, input, target, param, ctx.reduction, loss)
            return None, g_input, None, g_param, None

        return type(
            f"{''.join(w.title() for w in op.name.split('_'))}Function",
            (torch.autograd.Function,),
            {
                "__doc__": f"The eager path of ``{op.name}``: ``apply(kernels, input, target, param, reduction) -> loss``.",
                "forward": staticmethod(forward),
                "backward": staticmethod(backward),
            },
        )
