"""``gaussian_nll``: its kernel schemas, fakes and autograd (``_likelihood.LikelihoodOp``).

Math (``vaekern.reference``), per element with ``s`` the log-scale (sigma = exp(s)) of its
column: ``nll = 0.5 * (x - t)^2 * exp(-2s) + s + 0.5 * log(2 pi)``, summed over each row and
reduced over rows; ``d/dx = (x - t) * exp(-2s)``.

The kernels' ``log_scale`` is a tensor in the loss dtype, 0-d or one value per column of
the flattened row (``vaekern.functional`` broadcasts the user's to ``input.shape[1:]``,
and autograd sums the gradient back over the broadcast dims). Its gradient, with ``w_b``
the upstream gradient of row b (times 1/B for ``mean``), is
``d/ds_d = sum_b w_b * (1 - (x_bd - t_bd)^2 * exp(-2 s_d))`` (:func:`log_scale_grad`), in
differentiable PyTorch ops. One scale for all (0-d) takes it from the loss the kernel
already summed: ``sum_d (x_bd - t_bd)^2 exp(-2s) = 2 (nll_b - D (s + 0.5 log 2 pi))``, so
``d/ds = sum_b w_b (D (1 + 2 (s + 0.5 log 2 pi)) - 2 nll_b)``, and its backward makes no
pass over the image (one over input and target took about 5x a fixed scale's step). The
loss rounds to its dtype, so this adds an absolute error of about
``2u * |sum_b w_b nll_b|``, u of float32 for a float32 loss: against gradient terms of
size ``|w_b| D``, a relative ``2u |s + 0.5 log 2 pi + 1/2|``. One scale per column needs
the per-column sums: a pass over input and target. A fixed scale costs nothing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vaekern._ops._common import HALF_LOG_2PI, per_row
from vaekern._ops._likelihood import LikelihoodOp


def log_scale_grad(
    grad_out: Tensor, input: Tensor, target: Tensor, log_scale: Tensor, reduction: int, loss: Tensor
) -> Tensor:
    """d(grad_out . reduced loss)/d(log_scale), shaped like the kernels' log_scale; ``loss``
    is the op's own (the reduced Gaussian NLL, or its recon term in vae_loss)."""
    batch = input.shape[0]
    acc = log_scale.dtype
    if log_scale.dim() == 0:
        if batch == 0:  # no rows, no gradient (the mean's loss is 0/0 there)
            return torch.zeros_like(log_scale)
        # D for one row's weight (none, mean), B * D for the summed loss's.
        count = math.prod(input.shape[1:]) * (batch if reduction == 2 else 1)
        return (grad_out.to(acc) * (count * (1 + 2 * (log_scale + HALF_LOG_2PI)) - 2 * loss.to(acc))).sum()
    w = per_row((grad_out / batch if reduction == 1 else grad_out).to(acc), batch, 2)
    r = (input.to(acc) - target.to(acc)).reshape(batch, -1)
    per_column = (w * (1 - r * r * torch.exp(-2 * log_scale))).sum(0)
    return per_column


OP = LikelihoodOp("gaussian_nll", "Tensor log_scale", log_scale_grad)
SCHEMAS = OP.SCHEMAS
GaussianNLLFunction = OP.Function
register = OP.register
