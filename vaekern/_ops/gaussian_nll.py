"""``gaussian_nll``: its kernel schemas, fakes and autograd (``_likelihood.LikelihoodOp``).

Math (``vaekern.reference``), per element with ``s`` the log-scale (sigma = exp(s)) of its
column: ``nll = 0.5 * (x - t)^2 * exp(-2s) + s + 0.5 * log(2 pi)``, summed over each row and
reduced over rows; ``d/dx = (x - t) * exp(-2s)``.

The kernels' ``log_scale`` is a tensor in the loss dtype, 0-d or one value per column of
the flattened row (``vaekern.functional`` broadcasts the user's to ``input.shape[1:]``,
and autograd sums the gradient back over the broadcast dims). Its gradient, with ``w_b``
the upstream gradient of row b (times 1/B for ``mean``), is
``d/ds_d = sum_b w_b * (1 - (x_bd - t_bd)^2 * exp(-2 s_d))`` (:func:`log_scale_grad`), in
differentiable PyTorch ops over input and target: a learned scale costs one more pass over
them in backward; a fixed one costs nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vaekern._ops._common import per_row
from vaekern._ops._likelihood import LikelihoodOp


def log_scale_grad(grad_out: Tensor, input: Tensor, target: Tensor, log_scale: Tensor, reduction: int) -> Tensor:
    """d(grad_out . reduced loss)/d(log_scale), shaped like the kernels' log_scale."""
    batch = input.shape[0]
    acc = log_scale.dtype
    w = per_row((grad_out / batch if reduction == 1 else grad_out).to(acc), batch, 2)
    r = (input.to(acc) - target.to(acc)).reshape(batch, -1)
    per_column = (w * (1 - r * r * torch.exp(-2 * log_scale))).sum(0)
    return per_column.sum() if log_scale.dim() == 0 else per_column


OP = LikelihoodOp("gaussian_nll", "Tensor log_scale", log_scale_grad)
SCHEMAS = OP.SCHEMAS
GaussianNLLFunction = OP.Function
register = OP.register
