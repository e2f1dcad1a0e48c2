"""Continuous Bernoulli negative log-likelihood: ``vaekern_triton::continuous_bernoulli_nll``
and its backward.

Math, per element, with ``x`` the input and ``t`` the target in [0, 1]
(Loaiza-Ganem & Cunningham 2019; ``vaekern.reference``): the Bernoulli NLL of
``bernoulli_nll.py`` plus the log normalizer ``L(eta) = -log C(eta) = -log(eta / tanh(eta/2))``
of the logit eta:

* logits (eta = x): ``nll = max(x, 0) - x*t + log1p(exp(-|x|)) + L(x)``,
  ``d nll/dx = sigmoid(x) - t + L'(x)``, ``L'(eta) = 1/sinh(eta) - 1/eta``.
* probabilities: with ``lp = max(log x, -100)``, ``lq = max(log1p(-x), -100)`` (the
  Bernoulli's clamped logs) and ``eta = lp - lq`` (in [-100, 100], finite at x = 0 and 1):
  ``nll = -(t*lp + (1-t)*lq) + L(eta)``,
  ``d nll/dx = (x - t + L'(eta)) / max(x(1-x), 1e-12)`` (the Bernoulli's probability
  gradient plus L' times d eta/dx = 1/(x(1-x)), over the same floor).
* L and L' (``_common._cb_log_norm``): below |eta| = R a Taylor series in eta^2, above it
  ``-log(a) + log1p(-e) - log1p(e)`` and ``sign(eta) (2e/(1 - e^2) - 1/a)`` with a = |eta|,
  e = exp(-a): no cancellation at tiny logits, no overflow at large ones. R is 0.5 for
  float32 math and 1e-2 for float64 (``_common.CB_SERIES_MAX_F32``/``_F64``; the direct L'
  loses about 6/a^2 ulps, harmless above each R, and each series' truncation is below
  1e-9 there in float32 and far below 1e-16 in float64).

The element math is ``_common._continuous_bernoulli_logits_elem`` /
``_continuous_bernoulli_probs_elem``, which add L to the Bernoulli's element math, chosen
at compile time by ``FROM_LOGITS``; the tiling, row sums and gradient store are
``_common._loss_row_chunk``. The forward and backward launches, the deterministic
finalize and the in-place backward are exactly ``bernoulli_nll.py``'s (see there).

Dtypes: input float16, bfloat16, float32, float64; target any float dtype, bool or uint8,
each loaded in its own width. Sums and gradient math in float32 (float64 for float64
input); the gradient is rounded once to the input's dtype. The loss is float32/float64.

Saved for backward (by ``vaekern._ops.continuous_bernoulli_nll``): the gradient buffer
written here, and the input and target by reference, which the backward reads only for
the float16 recompute.

Limits: float32 math carries the absolute errors of the GPU's exp and log (about 1e-7 on
L, a few 1e-7 on L' near |eta| = 0.5, where the direct form starts). At eta = +-inf, L is
-inf and the Bernoulli part is inf or NaN: the loss is NaN, as in the reference. NaN in
gives NaN. Row layouts and lengths as for ``bernoulli_nll.py``; the interpreter's bfloat16
casts as there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vaekern._ops._common import acc_dtype
from vaekern._triton._common import (
    _chunk_bounds,
    _continuous_bernoulli_logits_elem,
    _continuous_bernoulli_probs_elem,
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
def _continuous_bernoulli_nll_fwd_kernel(
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
    ELEM: tl.constexpr = _continuous_bernoulli_logits_elem if FROM_LOGITS else _continuous_bernoulli_probs_elem
    total = _loss_row_chunk(
        ELEM, x_ptr + row * stride_x, t_ptr + row * stride_t, grad_ptr + row * D,
        lo, hi, D, B,
        part_ptr.dtype.element_ty, COMPUTE_GRAD, MEAN, BLOCK,
    )
    tl.store(part_ptr + row * C + chunk, total)


@triton.jit
def _continuous_bernoulli_nll_bwd_kernel(
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
    ELEM: tl.constexpr = _continuous_bernoulli_logits_elem if FROM_LOGITS else _continuous_bernoulli_probs_elem
    _scale_row_chunk(
        ELEM, grad_ptr + row * D, x_ptr + row * stride_x, t_ptr + row * stride_t, s,
        lo, hi, D, B, MEAN, RECOMPUTE, BLOCK,
    )


def continuous_bernoulli_nll(input, target, from_logits: bool, reduction: int, compute_grad: bool):
    """Fused continuous Bernoulli NLL and its saved gradient (schema
    ``vaekern_triton::continuous_bernoulli_nll``).

    Args:
        input: ``[B, ...]`` logits (or probabilities), float16/bfloat16/float32/float64.
        target: same shape, values in [0, 1]; any float dtype, bool or uint8.
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
            _continuous_bernoulli_nll_fwd_kernel[(B, C)](
                x, t, grad if compute_grad else x, part,
                D, stride_x, stride_t, B, n_blocks,
                FROM_LOGITS=from_logits, COMPUTE_GRAD=compute_grad, MEAN=reduction == 1,
                BLOCK=BLOCK, num_warps=num_warps,
            )
        if not direct:
            finalize(part, None, None, out, None, None, reduction)
    return out, grad if compute_grad else input.new_empty((0,))


def continuous_bernoulli_nll_backward_(grad_input, grad_out, input, target, from_logits: bool, reduction: int) -> None:
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
        raise ValueError("continuous_bernoulli_nll_backward_: grad_input must be the contiguous saved gradient")
    B = grad_input.shape[0]
    D = grad_input.numel() // B
    x, t, stride_x, stride_t, recompute = recompute_operands(grad_input, input, target)
    BLOCK, num_warps, C, n_blocks = row_config(B, D, grad_input.element_size())
    with device_guard(grad_input):
        _continuous_bernoulli_nll_bwd_kernel[(B, C)](
            grad_input, grad_out, x, t, D, scale_stride(grad_out), stride_x, stride_t, B, n_blocks,
            FROM_LOGITS=from_logits, MEAN=reduction == 1, RECOMPUTE=recompute,
            BLOCK=BLOCK, num_warps=num_warps,
        )
