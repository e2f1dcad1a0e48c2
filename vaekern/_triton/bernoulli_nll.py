"""Bernoulli negative log-likelihood: ``vaekern_triton::bernoulli_nll`` and its backward.

Math, per element, with ``x`` the input and ``t`` the target (``vaekern.reference``):

* logits: ``nll = max(x, 0) - x*t + log1p(exp(-|x|))``, ``d nll/dx = sigmoid(x) - t``.
  One ``e = exp(-|x|)`` serves both: ``sigmoid(x) = 1/(1+e)`` for x >= 0, ``e/(1+e)``
  below; nothing overflows for any finite logit (+-1e4 included).
* probabilities: ``nll = -(t*max(log p, -100) + (1-t)*max(log1p(-p), -100))``,
  ``d nll/dp = (p - t) / max(p*(1-p), 1e-12)`` (``F.binary_cross_entropy``'s gradient,
  finite at p = 0 and 1). The limits are ``_common.BCE_LOG_MIN`` and ``BCE_GRAD_EPS``.
* ``log1p`` is ``_common._log1p`` (no libdevice): a few ulp, see there.

The element math is ``_common._bernoulli_logits_elem`` / ``_bernoulli_probs_elem``, chosen
at compile time by ``FROM_LOGITS``; the tiling, the row sums and the gradient's store are
``_common._loss_row_chunk``, shared with ``vae_loss.py``. Another likelihood reuses this
kernel's shape with its own element function (``_common``'s header says how).

Forward, one pass over (input, target): program (b, c) sums the NLL of row b over its
column chunk c into ``partials[b, c]`` and writes the gradient of the *reduced* loss for
an upstream gradient of 1 (``/B`` folded in for mean) into a fresh contiguous buffer.
``_finalize_kernel`` then reduces the partials in a fixed order (a second, tiny launch;
skipped for ``reduction="none"`` when each row is one chunk, where the partials buffer is
the output). No atomics: two runs are bitwise equal.

Backward: ``grad_input[b] *= grad_out[b]`` in place; a program whose scale is exactly 1
returns without touching memory, so ``loss.backward()`` moves no image-sized bytes. A
float16 gradient element outside float16's normal range is recomputed from input and
target in float32 with the row's scale applied before the rounding
(``_common._scale_row_chunk``): the forward's value for an upstream of 1 overflows to
inf where (p - t) / (p(1-p)) passes 65504 (below p = 1.5e-5), which a loss weight below 1
brings back into range, and is a subnormal with bits lost below 2**-14 (with 1/B folded
in, common for confident pixels), which a GradScaler's scale would have kept.

Dtypes: input float16, bfloat16, float32, float64; target any float dtype, bool or uint8,
each loaded in its own width. Sums and gradient math in float32 (float64 for float64
input); the gradient is rounded once to the input's dtype. The loss is float32/float64.

Saved for backward (by ``vaekern._ops.bernoulli_nll``): the gradient buffer written here,
and the input and target by reference, which the backward reads only for the float16
recompute.

Limits: rows with contiguous non-batch dims are read in place at any row stride
(padding, ``expand``-ed targets); other layouts (a transposed matrix, channels-last) are
copied with ``.contiguous()`` first (``_common.as_rows``). D = numel/B below 2**31 - 2**16
(``_common.MAX_ROW``; longer rows raise ValueError). Triton's interpreter reads bfloat16
subnormals wrongly; compiled code reads them exactly (``_common``'s header, "Conversions").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vaekern._ops._common import acc_dtype
from vaekern._triton._common import (
    _bernoulli_logits_elem,
    _bernoulli_probs_elem,
    _chunk_bounds,
    _loss_row_chunk,
    _scale_row_chunk,
    as_loadable,
    as_rows,
    device_guard,
    finalize,
    recompute_operands,
    row_config,
    scale_stride,
)


@triton.jit
def _bernoulli_nll_fwd_kernel(
    x_ptr,  # [B, D] logits or probabilities, row stride stride_x, unit column stride
    t_ptr,  # [B, D] targets (float, or uint8 for bool/uint8), row stride stride_t
    grad_ptr,  # [B, D] contiguous, x's dtype: d(reduced loss)/dx (COMPUTE_GRAD)
    part_ptr,  # [B, C] acc dtype: NLL of row b summed over column chunk c
    D,  # elements per row
    stride_x,  # row stride of x, in elements
    stride_t,  # row stride of t, in elements
    B,  # rows (the gradient is divided by it for MEAN)
    n_blocks,  # column blocks per chunk; chunk c covers [c, c+1) * n_blocks * BLOCK
    FROM_LOGITS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    C = tl.num_programs(1)
    lo, hi = _chunk_bounds(chunk, n_blocks, D, BLOCK)
    ELEM: tl.constexpr = _bernoulli_logits_elem if FROM_LOGITS else _bernoulli_probs_elem
    total = _loss_row_chunk(
        ELEM, x_ptr + row * stride_x, t_ptr + row * stride_t, grad_ptr + row * D,
        lo, hi, D, B,
        part_ptr.dtype.element_ty, COMPUTE_GRAD, MEAN, BLOCK,
    )
    tl.store(part_ptr + row * C + chunk, total)


@triton.jit
def _bernoulli_nll_bwd_kernel(
    grad_ptr,  # [B, D] contiguous: the saved gradient, scaled in place
    go_ptr,  # [B] or [] fp32/fp64: upstream gradient, one scale per row
    x_ptr,  # [B, D] the forward's input, row stride stride_x (read only if RECOMPUTE)
    t_ptr,  # [B, D] its target, row stride stride_t (likewise)
    D,  # elements per row
    stride_go,  # 0 for a scalar grad_out, else its stride
    stride_x,
    stride_t,
    B,  # rows (the forward divided the gradient by it for MEAN)
    n_blocks,  # column blocks per chunk (as in the forward)
    FROM_LOGITS: tl.constexpr,
    MEAN: tl.constexpr,
    RECOMPUTE: tl.constexpr,  # float16: recompute the elements out of its normal range
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    s = tl.load(go_ptr + row * stride_go)
    lo, hi = _chunk_bounds(chunk, n_blocks, D, BLOCK)
    ELEM: tl.constexpr = _bernoulli_logits_elem if FROM_LOGITS else _bernoulli_probs_elem
    _scale_row_chunk(
        ELEM, grad_ptr + row * D, x_ptr + row * stride_x, t_ptr + row * stride_t, s,
        lo, hi, D, B, MEAN, RECOMPUTE, BLOCK,
    )


def bernoulli_nll(input, target, from_logits: bool, reduction: int, compute_grad: bool):
    """Fused Bernoulli NLL and its saved gradient (schema ``vaekern_triton::bernoulli_nll``).

    Args:
        input: ``[B, ...]`` logits (or probabilities), float16/bfloat16/float32/float64.
        target: same shape; any float dtype, bool or uint8.
        from_logits: whether ``input`` holds logits.
        reduction: 0 none, 1 mean, 2 sum.
        compute_grad: whether to write the gradient.

    Returns:
        ``(out, grad_input)``: ``out`` of shape ``(B,)`` or ``()`` in float32 (float64 for
        float64 input); ``grad_input`` contiguous with input's shape and dtype, the
        gradient of ``out`` for an upstream gradient of 1, or an empty tensor.
    """
    acc = acc_dtype(input)
    B = input.shape[0]
    x, D, stride_x = as_rows(input)
    t, _, stride_t = as_rows(as_loadable(target))
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device) if compute_grad else None
    out = input.new_empty((B,) if reduction == 0 else (), dtype=acc)
    BLOCK, num_warps, C, n_blocks = row_config(B, D, input.element_size())
    direct = reduction == 0 and C == 1
    part = out.view(B, 1) if direct else torch.empty((B, C), dtype=acc, device=input.device)
    with device_guard(input):
        if B > 0:
            _bernoulli_nll_fwd_kernel[(B, C)](
                x, t, grad if compute_grad else x, part,
                D, stride_x, stride_t, B, n_blocks,
                FROM_LOGITS=from_logits, COMPUTE_GRAD=compute_grad, MEAN=reduction == 1,
                BLOCK=BLOCK, num_warps=num_warps,
            )
        if not direct:
            finalize(part, None, None, out, None, None, reduction)
    return out, grad if compute_grad else input.new_empty((0,))


def bernoulli_nll_backward_(grad_input, grad_out, input, target, from_logits: bool, reduction: int) -> None:
    """``grad_input[b] *= grad_out[b]`` (or ``*= grad_out`` for a scalar), in place; a
    float16 element outside float16's normal range is recomputed from ``input`` and ``target``.

    Args:
        grad_input: ``[B, ...]`` contiguous, the gradient saved by the forward.
        grad_out: ``()`` or ``(B,)`` float32/float64 upstream gradient.
        input, target, from_logits, reduction: the forward's.
    """
    if grad_input.numel() == 0:
        return
    if not grad_input.is_contiguous():
        raise ValueError("bernoulli_nll_backward_: grad_input must be the contiguous saved gradient")
    B = grad_input.shape[0]
    D = grad_input.numel() // B
    x, t, stride_x, stride_t, recompute = recompute_operands(grad_input, input, target)
    BLOCK, num_warps, C, n_blocks = row_config(B, D, grad_input.element_size())
    with device_guard(grad_input):
        _bernoulli_nll_bwd_kernel[(B, C)](
            grad_input, grad_out, x, t, D, scale_stride(grad_out), stride_x, stride_t, B, n_blocks,
            FROM_LOGITS=from_logits, MEAN=reduction == 1, RECOMPUTE=recompute,
            BLOCK=BLOCK, num_warps=num_warps,
        )
