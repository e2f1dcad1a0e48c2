"""Gaussian negative log-likelihood: ``vaekern_triton::gaussian_nll`` and its backward.

Math, per element, with ``x`` the input (the mean), ``t`` the target and ``s`` the log
standard deviation of the element's column (``vaekern.reference``):

* ``nll = 0.5 * (x - t)^2 * exp(-2s) + s + 0.5*log(2*pi)``, ``d nll/dx = (x - t) * exp(-2s)``.
  A true NLL in nats; the constant is ``_common._HALF_LOG_2PI``.
* ``s`` is ``log_scale[d]`` for column d of the flattened row (``[D]``), or one value for
  every element (``[]``): the op layer broadcasts the user's log_scale to
  ``input.shape[1:]`` and flattens it. The kernel reads it with column stride ``S_STRIDE``
  (1, or 0 for one value: every lane then loads the same cached address). The gradient
  with respect to log_scale is not computed here: the op layer forms it
  (``d nll/ds = 1 - (x - t)^2 exp(-2s)``).

The element math is ``_common._gaussian_elem``; the tiling, the per-column parameter's
loads, the row sums and the gradient's store are ``_common._loss_row_chunk``, as for
``bernoulli_nll.py``, whose layout this module follows.

Forward, one pass over (input, target, log_scale): program (b, c) sums the NLL of row b
over its column chunk c into ``partials[b, c]`` and writes the gradient of the *reduced*
loss for an upstream gradient of 1 (``/B`` folded in for mean) into a fresh contiguous
buffer; ``_finalize_kernel`` reduces the partials in a fixed order (skipped for
``reduction="none"`` when each row is one chunk). No atomics: two runs are bitwise equal.

Backward: ``grad_input[b] *= grad_out[b]`` in place, rows whose scale is exactly 1 left
untouched; a float16 gradient element outside float16's normal range (an overflow to inf
where exp(-2s) is large, or a subnormal) is recomputed from input, target and log_scale in
float32 with the row's scale applied before the one rounding (``_common._scale_row_chunk``).

Dtypes: input float16, bfloat16, float32, float64; target any float dtype, bool or uint8,
each loaded in its own width; log_scale in the math dtype. Sums and gradient math in
float32 (float64 for float64 input); the gradient is rounded once to the input's dtype.
The loss is float32/float64.

Saved for backward (by ``vaekern._ops.gaussian_nll``): the gradient buffer written here,
and the input, target and log_scale by reference, which the backward reads only for the
float16 recompute.

Limits: no clamp. exp(-2s) overflows for s below about -44 in float32 math (-354 in
float64): the loss and gradient are then inf (NaN where x == t). NaN in any operand gives
NaN. Row layouts and lengths as for ``bernoulli_nll.py`` (``_common.as_rows``,
``_common.MAX_ROW``); the interpreter's bfloat16 casts as there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vaekern._ops._common import acc_dtype
from vaekern._triton._common import (
    _chunk_bounds,
    _gaussian_elem,
    _loss_row_chunk,
    _scale_row_chunk,
    as_loadable,
    as_rows,
    device_guard,
    finalize,
    log_scale_operand,
    recompute_operands,
    row_config,
    scale_stride,
)


@triton.jit
def _gaussian_nll_fwd_kernel(
    x_ptr,  # [B, D] means, row stride stride_x, unit column stride
    t_ptr,  # [B, D] targets (float, or uint8 for bool/uint8), row stride stride_t
    s_ptr,  # [D] (S_STRIDE 1) or [] (S_STRIDE 0) acc dtype: log standard deviation per column
    grad_ptr,  # [B, D] contiguous, x's dtype: d(reduced loss)/dx (COMPUTE_GRAD)
    part_ptr,  # [B, C] acc dtype: NLL of row b summed over column chunk c
    D,  # elements per row
    stride_x,  # row stride of x, in elements
    stride_t,  # row stride of t, in elements
    B,  # rows (the gradient is divided by it for MEAN)
    n_blocks,  # column blocks per chunk; chunk c covers [c, c+1) * n_blocks * BLOCK
    S_STRIDE: tl.constexpr,  # column stride of s: 1, or 0 for one log_scale
    COMPUTE_GRAD: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    C = tl.num_programs(1)
    lo, hi = _chunk_bounds(chunk, n_blocks, D, BLOCK)
    total = _loss_row_chunk(
        _gaussian_elem, x_ptr + row * stride_x, t_ptr + row * stride_t, grad_ptr + row * D,
        lo, hi, D, B,
        part_ptr.dtype.element_ty, COMPUTE_GRAD, MEAN, BLOCK,
        p_row=s_ptr, P_STRIDE=S_STRIDE,
    )
    tl.store(part_ptr + row * C + chunk, total)


@triton.jit
def _gaussian_nll_bwd_kernel(
    grad_ptr,  # [B, D] contiguous: the saved gradient, scaled in place
    go_ptr,  # [B] or [] fp32/fp64: upstream gradient, one scale per row
    x_ptr,  # [B, D] the forward's input, row stride stride_x (read only if RECOMPUTE)
    t_ptr,  # [B, D] its target, row stride stride_t (likewise)
    s_ptr,  # [D] or [] fp32: its log_scale, column stride S_STRIDE (likewise)
    D,  # elements per row
    stride_go,  # 0 for a scalar grad_out, else its stride
    stride_x,
    stride_t,
    B,  # rows (the forward divided the gradient by it for MEAN)
    n_blocks,  # column blocks per chunk (as in the forward)
    S_STRIDE: tl.constexpr,
    MEAN: tl.constexpr,
    RECOMPUTE: tl.constexpr,  # float16: recompute the elements out of its normal range
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    s = tl.load(go_ptr + row * stride_go)
    lo, hi = _chunk_bounds(chunk, n_blocks, D, BLOCK)
    _scale_row_chunk(
        _gaussian_elem, grad_ptr + row * D, x_ptr + row * stride_x, t_ptr + row * stride_t, s,
        lo, hi, D, B, MEAN, RECOMPUTE, BLOCK,
        p_row=s_ptr, P_STRIDE=S_STRIDE,
    )


def gaussian_nll(input, target, log_scale, reduction: int, compute_grad: bool):
    """Fused Gaussian NLL and its saved gradient (schema ``vaekern_triton::gaussian_nll``).

    Args:
        input: ``[B, ...]`` means, float16/bfloat16/float32/float64.
        target: same shape; any float dtype, bool or uint8.
        log_scale: log standard deviation in the math dtype (float32, or float64 for
            float64 input): 0-d, or 1-d with ``D = input[0].numel()`` elements, one per
            column of the flattened row.
        reduction: 0 none, 1 mean, 2 sum.
        compute_grad: whether to write the gradient.

    Returns:
        ``(out, grad_input)``: ``out`` of shape ``(B,)`` or ``()`` in float32 (float64 for
        float64 input); ``grad_input`` contiguous with input's shape and dtype, the
        gradient of ``out`` with respect to ``input`` for an upstream gradient of 1, or an
        empty tensor.
    """
    acc = acc_dtype(input)
    B = input.shape[0]
    x, D, stride_x = as_rows(input)
    t, _, stride_t = as_rows(as_loadable(target))
    s, s_stride = log_scale_operand(log_scale, input, acc)
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device) if compute_grad else None
    out = input.new_empty((B,) if reduction == 0 else (), dtype=acc)
    BLOCK, num_warps, C, n_blocks = row_config(B, D, input.element_size())
    direct = reduction == 0 and C == 1
    part = out.view(B, 1) if direct else torch.empty((B, C), dtype=acc, device=input.device)
    with device_guard(input):
        if B > 0:
            _gaussian_nll_fwd_kernel[(B, C)](
                x, t, s, grad if compute_grad else x, part,
                D, stride_x, stride_t, B, n_blocks,
                S_STRIDE=s_stride, COMPUTE_GRAD=compute_grad, MEAN=reduction == 1,
                BLOCK=BLOCK, num_warps=num_warps,
            )
        if not direct:
            finalize(part, None, None, out, None, None, reduction)
    return out, grad if compute_grad else input.new_empty((0,))


def gaussian_nll_backward_(grad_input, grad_out, input, target, log_scale, reduction: int) -> None:
    """``grad_input[b] *= grad_out[b]`` (or ``*= grad_out`` for a scalar), in place; a
    float16 element outside float16's normal range is recomputed from ``input``, ``target``
    and ``log_scale``.

    Args:
        grad_input: ``[B, ...]`` contiguous, the gradient saved by the forward.
        grad_out: ``()`` or ``(B,)`` float32/float64 upstream gradient.
        input, target, log_scale, reduction: the forward's.
    """
    if grad_input.numel() == 0:
        return
    if not grad_input.is_contiguous():
        raise ValueError("gaussian_nll_backward_: grad_input must be the contiguous saved gradient")
    B = grad_input.shape[0]
    D = grad_input.numel() // B
    x, t, stride_x, stride_t, recompute = recompute_operands(grad_input, input, target)
    # log_scale is read only by the float16 recompute; elsewhere S_STRIDE 0 spares a compile.
    s, s_stride = log_scale_operand(log_scale, input, acc_dtype(input)) if recompute else (grad_out, 0)
    BLOCK, num_warps, C, n_blocks = row_config(B, D, grad_input.element_size())
    with device_guard(grad_input):
        _gaussian_nll_bwd_kernel[(B, C)](
            grad_input, grad_out, x, t, s, D, scale_stride(grad_out), stride_x, stride_t, B, n_blocks,
            S_STRIDE=s_stride, MEAN=reduction == 1, RECOMPUTE=recompute,
            BLOCK=BLOCK, num_warps=num_warps,
        )
