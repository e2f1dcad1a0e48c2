"""The fused negative ELBO: ``vaekern_triton::vae_loss`` and ``vae_loss_backward_``.

Math (``vaekern.reference``), with ``reduce`` the batch reduction (mean, sum or none):

* ``recon = reduce(sum_d nll(x[b, d], t[b, d]))`` with ``nll`` the likelihood's
  (``LIKELIHOOD``): the Bernoulli of ``bernoulli_nll.py`` (softplus form for logits,
  -100-clamped logs for probabilities), the Gaussian of ``gaussian_nll.py`` with its
  per-column log_scale, or the continuous Bernoulli of ``continuous_bernoulli_nll.py``;
* ``kl = reduce(0.5 * sum_z (m^2 + exp(min(l, 60)) - 1 - l))``, with (m, l) the latents
  standardized by the prior N(pm, exp(plv)) on load (``gaussian_kl.py``; without a prior,
  ``m = mu`` and ``l = lv``);
* ``loss = recon + beta * kl``, beta a 0-d tensor (read in the kernel: no host sync,
  and annealing it in place needs no recompile).
* with free bits lambda (a 0-d tensor, mean or sum only), ``kl = sum_z where(S_z / B <
  lambda, lambda, S_z / B)``, times B for sum, where ``S_z`` is latent element z's KL
  summed over the batch (NaN for a NaN lambda); ``w_z = 0`` where lambda holds element z
  (or is NaN), else 1, is written for the backward; lambda is read as float64.

The KL's mu^2 and its sums are float64 whatever the loss dtype (under free bits the column
sums are in the latents' math dtype instead, as ``gaussian_kl``'s), and the loss is formed from
them in float64, then rounded, as the float64 oracle forms it: for finite float32 latents
the KL is then finite (mu^2 <= 1.2e77), so beta = 0 leaves the recon term where a float32
KL beyond its range made the loss 0 * inf = NaN. Skipping the product at beta = 0 would
also drop a KL that is infinite in the oracle too (an infinite latent), whose loss is NaN
there. The rest of a KL element, ``expm1(min(lv, 60)) - lv``, is finite in float32 and
stays in the loss dtype; the KL part is the KL rounded to it (inf beyond its range).

Backward, for upstream gradients ``(g_loss, g_recon, g_kl)``, each () or (B,):

* ``d/dx[b] = (g_loss + g_recon)[b] * grad_recon[b]``, where ``grad_recon`` is the
  gradient for an upstream 1, written by the forward (``/B`` folded in for mean) and
  scaled in place; a row whose scale is exactly 1 is not touched, and a float16 element
  outside float16's normal range is recomputed from recon and target (as in
  ``bernoulli_nll.py``).
* the latents' and the priors' gradients as in ``gaussian_kl.py`` (``d/dmu = s * mu``,
  ``d/dlv = s * 0.5 * (exp(min(lv, 60)) - 1)`` without a prior), with
  ``s = (g_loss * beta + g_kl)[b]``, divided by B for mean, and 0 where ``w_z = 0``
  under free bits (whatever s, as the oracle's where).

The reconstruction term is generic: the kernel hands the likelihood's element function
(chosen at compile time by ``LIKELIHOOD`` and ``FROM_LOGITS``; the Gaussian's with its
log_scale as the per-column parameter) to ``_common._loss_row_chunk``, which tiles the
row, sums the NLL and writes its gradient; the KL, the row scaling of the backward and the
finalize never see the likelihood. A new likelihood is one element function there (see
``_common``'s header), plus its compile-time choice of ``ELEM`` here and its code in
``vaekern._ops._common.LIKELIHOODS``.

Launches. Forward: ``_vae_loss_fwd_kernel`` over a (B, C) grid: program (b, c) reads
column chunk c of row b once (NLL partial sum + gradient), and program (b, 0) also sums
row b's KL; then ``_finalize_kernel`` (a second, tiny launch) reduces the ``[B, C]`` and
``[B]`` partials in a fixed order and forms ``loss = recon + beta * kl``. No atomics: two
runs are bitwise equal. Under free bits no program sums a row's KL: ``gaussian_kl.py``'s
column pass (``kl_rows`` with ``KL_COLUMNS``, one program per block of latent elements)
writes the ``[Z]`` batch sums first, and the finalize applies lambda to them in column
order (three launches, one op). Backward: ``_vae_loss_bwd_kernel``, one launch over the
same grid; program (b, 0) also writes row b's latent gradients.

Dtypes: recon float16, bfloat16, float32, float64; target any float dtype, bool or uint8;
mu/logvar the same float dtype as each other. Losses in float32, or float64 if any of
recon/mu/logvar is float64, computed in that dtype (the KL's square and sums in float64,
above); gradients in each input's dtype.

Saved for backward (by ``vaekern._ops.vae_loss``): the reconstruction gradient written here (our own
buffer), mu, logvar, the priors, beta and the free bits' weights; recon and target by
reference, read only for that recompute.

Limits: as ``bernoulli_nll.py`` and ``gaussian_kl.py`` (row strides read in place,
other layouts copied; D below 2**31 - 2**16, else ValueError). Blocks are sized by
the math dtype: float32 logits with float64 latents run float64-sized blocks. A
bfloat16 gradient of float64 math rounds twice on sm_80, and Triton's interpreter
narrows float64 to bfloat16 wrongly (``_common``'s header, "Conversions").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vaekern._ops._common import KL_COLUMNS, acc_dtype, prior_grad_like
from vaekern._triton._common import (
    _bernoulli_logits_elem,
    _bernoulli_probs_elem,
    _chunk_bounds,
    _continuous_bernoulli_logits_elem,
    _continuous_bernoulli_probs_elem,
    _gaussian_elem,
    _kl_var_elem,
    _loss_row_chunk,
    _prior_kl_grads,
    _prior_standardized,
    _scale_row_chunk,
    as_loadable,
    as_rows,
    device_guard,
    finalize,
    log_scale_operand,
    math_itemsize,
    prior_operand,
    recompute_operands,
    row_config,
    scale_stride,
)
from vaekern._triton.gaussian_kl import kl_rows


@triton.jit
def _vae_loss_fwd_kernel(
    x_ptr,  # [B, D] decoder logits or probabilities, row stride stride_x, unit column stride
    t_ptr,  # [B, D] targets (float, or uint8 for bool/uint8), row stride stride_t
    grad_ptr,  # [B, D] contiguous, x's dtype: d(reduced recon)/dx (COMPUTE_GRAD)
    part_ptr,  # [B, C] acc dtype: NLL of row b summed over column chunk c
    mu_ptr,  # [B, Z] posterior means, row stride stride_mu
    lv_ptr,  # [B, Z] posterior log-variances, row stride stride_lv
    kl_ptr,  # [B] float64: KL of row b
    D,  # pixels per row
    Z,  # latents per row
    stride_x,  # row stride of x, in elements
    stride_t,  # row stride of t, in elements
    stride_mu,  # row stride of mu, in elements
    stride_lv,  # row stride of logvar, in elements
    B,  # rows (the gradient is divided by it for MEAN)
    n_blocks,  # column blocks per chunk; chunk c covers [c, c+1) * n_blocks * BLOCK
    s_ptr,  # [D] or [] acc dtype: the Gaussian's log_scale, column stride S_STRIDE (LIKELIHOOD 1)
    pm_ptr,  # [B, Z] prior means at strides (stride_pm_b, stride_pm_z) (HAS_PM)
    plv_ptr,  # [B, Z] prior log-variances, likewise (HAS_PLV)
    stride_pm_b,  # the prior mean's row and column strides (0 along a broadcast dim)
    stride_pm_z,
    stride_plv_b,  # likewise for the prior log-variance
    stride_plv_z,
    LIKELIHOOD: tl.constexpr,  # 0 Bernoulli, 1 Gaussian, 2 continuous Bernoulli (_ops LIKELIHOODS)
    S_STRIDE: tl.constexpr,
    HAS_PM: tl.constexpr,
    HAS_PLV: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    MEAN: tl.constexpr,
    KL_ROWS: tl.constexpr,  # sum each row's KL (not under free bits, whose KL is by columns)
    BLOCK: tl.constexpr,
    BLOCK_Z: tl.constexpr,
):
    ACC = part_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    C = tl.num_programs(1)
    lo, hi = _chunk_bounds(chunk, n_blocks, D, BLOCK)
    if LIKELIHOOD == 1:  # the one likelihood with a parameter per column
        total = _loss_row_chunk(
            _gaussian_elem, x_ptr + row * stride_x, t_ptr + row * stride_t, grad_ptr + row * D,
            lo, hi, D, B,
            ACC, COMPUTE_GRAD, MEAN, BLOCK,
            p_row=s_ptr, P_STRIDE=S_STRIDE,
        )
    else:
        ELEM: tl.constexpr = (
            (_continuous_bernoulli_logits_elem if FROM_LOGITS else _continuous_bernoulli_probs_elem)
            if LIKELIHOOD == 2
            else (_bernoulli_logits_elem if FROM_LOGITS else _bernoulli_probs_elem)
        )
        total = _loss_row_chunk(
            ELEM, x_ptr + row * stride_x, t_ptr + row * stride_t, grad_ptr + row * D,
            lo, hi, D, B,
            ACC, COMPUTE_GRAD, MEAN, BLOCK,
        )
    tl.store(part_ptr + row * C + chunk, total)
    if KL_ROWS and chunk == 0:
        # mu^2 and the sums in float64, the rest of each element in ACC (the header says why).
        acc = tl.zeros([BLOCK_Z], dtype=tl.float64)
        for z0 in range(0, Z, BLOCK_Z):
            cols = z0 + tl.arange(0, BLOCK_Z)
            m = cols < Z
            mu = tl.load(mu_ptr + row * stride_mu + cols, mask=m, other=0.0).to(ACC)
            lv = tl.load(lv_ptr + row * stride_lv + cols, mask=m, other=0.0).to(ACC)
            mu, lv = _prior_standardized(
                mu, lv, pm_ptr + row * stride_pm_b + cols * stride_pm_z,
                plv_ptr + row * stride_plv_b + cols * stride_plv_z, m, HAS_PM, HAS_PLV,
            )  # fmt: skip
            mu = mu.to(tl.float64)
            acc += tl.where(m, mu * mu + _kl_var_elem(lv).to(tl.float64), 0.0)
        tl.store(kl_ptr + row, 0.5 * tl.sum(acc, axis=0))


@triton.jit
def _vae_loss_bwd_kernel(
    grad_ptr,  # [B, D] contiguous: the saved reconstruction gradient, scaled in place
    gl_ptr,  # [B] or [] acc dtype: upstream gradient of the loss
    gr_ptr,  # [B] or [] acc dtype: upstream gradient of the recon term
    gk_ptr,  # [B] or [] acc dtype: upstream gradient of the KL term
    beta_ptr,  # [] acc dtype: KL weight
    mu_ptr,  # [B, Z] posterior means, row stride stride_mu
    lv_ptr,  # [B, Z] posterior log-variances, row stride stride_lv
    gmu_ptr,  # [B, Z] contiguous, mu's dtype: d/dmu
    glv_ptr,  # [B, Z] contiguous, logvar's dtype: d/dlogvar
    pm_ptr,  # [B, Z] prior means at strides (stride_pm_b, stride_pm_z) (HAS_PM)
    plv_ptr,  # [B, Z] prior log-variances, likewise (HAS_PLV)
    gpm_ptr,  # [B, Z] contiguous, the prior's dtype: d/dprior_mu per element (HAS_PM)
    gplv_ptr,  # [B, Z] contiguous, likewise: d/dprior_logvar (HAS_PLV)
    stride_pm_b,  # the prior mean's row and column strides (0 along a broadcast dim)
    stride_pm_z,
    stride_plv_b,  # likewise for the prior log-variance
    stride_plv_z,
    D,  # pixels per row (0: no reconstruction gradient to scale)
    Z,  # latents per row
    stride_gl,  # 0 for a scalar grad, else its stride (likewise the next two)
    stride_gr,
    stride_gk,
    stride_mu,  # row stride of mu, in elements
    stride_lv,  # row stride of logvar, in elements
    B,  # rows (the KL scale is divided by it for MEAN)
    n_blocks,  # column blocks per chunk (as in the forward)
    x_ptr,  # [B, D] the forward's recon, row stride stride_x (read only if RECOMPUTE)
    t_ptr,  # [B, D] its target, row stride stride_t (likewise)
    stride_x,
    stride_t,
    s_ptr,  # [D] or [] the Gaussian's log_scale, column stride S_STRIDE (likewise)
    w_ptr,  # [Z] loss dtype: the free bits' per-element weight of the KL scale (FREE_BITS)
    LIKELIHOOD: tl.constexpr,
    S_STRIDE: tl.constexpr,
    HAS_PM: tl.constexpr,
    HAS_PLV: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    MEAN: tl.constexpr,
    FREE_BITS: tl.constexpr,
    RECOMPUTE: tl.constexpr,  # float16: recompute the elements out of its normal range
    BLOCK: tl.constexpr,
    BLOCK_Z: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    g_loss = tl.load(gl_ptr + row * stride_gl)
    if chunk == 0:
        s = g_loss * tl.load(beta_ptr) + tl.load(gk_ptr + row * stride_gk)
        if MEAN:
            s = s / B
        for z0 in range(0, Z, BLOCK_Z):
            cols = z0 + tl.arange(0, BLOCK_Z)
            m = cols < Z
            mu = tl.load(mu_ptr + row * stride_mu + cols, mask=m, other=0.0)
            lv = tl.load(lv_ptr + row * stride_lv + cols, mask=m, other=0.0)
            out = row * Z + cols
            s_z = s
            if FREE_BITS:  # 0 where the free bits hold the element, whatever s (the oracle's where)
                s_z = tl.where(tl.load(w_ptr + cols, mask=m, other=0.0) != 0.0, s, 0.0)
            g_mu, g_lv = _prior_kl_grads(
                s_z, mu.to(s.dtype), lv.to(s.dtype), pm_ptr + row * stride_pm_b + cols * stride_pm_z,
                plv_ptr + row * stride_plv_b + cols * stride_plv_z, gpm_ptr + out, gplv_ptr + out, m, HAS_PM, HAS_PLV,
            )  # fmt: skip
            tl.store(gmu_ptr + row * Z + cols, g_mu.to(gmu_ptr.dtype.element_ty), mask=m)
            tl.store(glv_ptr + row * Z + cols, g_lv.to(glv_ptr.dtype.element_ty), mask=m)
    lo, hi = _chunk_bounds(chunk, n_blocks, D, BLOCK)
    s_row = g_loss + tl.load(gr_ptr + row * stride_gr)
    if LIKELIHOOD == 1:
        _scale_row_chunk(
            _gaussian_elem, grad_ptr + row * D, x_ptr + row * stride_x, t_ptr + row * stride_t,
            s_row, lo, hi, D, B, MEAN, RECOMPUTE, BLOCK,
            p_row=s_ptr, P_STRIDE=S_STRIDE,
        )
    else:
        ELEM: tl.constexpr = (
            (_continuous_bernoulli_logits_elem if FROM_LOGITS else _continuous_bernoulli_probs_elem)
            if LIKELIHOOD == 2
            else (_bernoulli_logits_elem if FROM_LOGITS else _bernoulli_probs_elem)
        )
        _scale_row_chunk(
            ELEM, grad_ptr + row * D, x_ptr + row * stride_x, t_ptr + row * stride_t,
            s_row, lo, hi, D, B, MEAN, RECOMPUTE, BLOCK,
        )


def _block_z(Z: int, num_warps: int, itemsize: int) -> int:
    """Latent block of the row's KL: up to 4 values per thread (1 for float64 math, see
    ``_common.latent_config``), looped over for longer latent rows."""
    per_thread = 4 if itemsize <= 4 else 1
    return max(16, min(triton.next_power_of_2(max(Z, 1)), 32 * num_warps * per_thread))


def vae_loss(
    recon, target, mu, logvar, prior_mu, prior_logvar, free_bits, beta, log_scale, likelihood: int,
    from_logits: bool, reduction: int, compute_grad: bool,
):
    """Fused negative ELBO (schema ``vaekern_triton::vae_loss``).

    Args:
        recon: ``[B, ...]`` decoder logits (or probabilities).
        target: same shape; any float dtype, bool or uint8.
        mu, logvar: ``[B, ...]`` posterior parameters, same shape and dtype.
        prior_mu, prior_logvar: the KL's prior, None (0) or broadcasting to mu, in the
            latents' math dtype (``_common.prior_operand``).
        free_bits: None, or the free bits lambda, a 0-d floating tensor read as float64 (mean
            or sum only).
        beta: 0-d tensor in the loss dtype, the KL weight.
        log_scale: the Gaussian's log standard deviation in the loss dtype, 0-d or one per
            column of the flattened row (read for ``likelihood`` 1 only).
        likelihood: 0 Bernoulli, 1 Gaussian, 2 continuous Bernoulli.
        from_logits: whether ``recon`` holds logits (the Bernoullis).
        reduction: 0 none, 1 mean, 2 sum.
        compute_grad: whether to write the reconstruction gradient.

    Returns:
        ``(loss, recon_term, kl_term, grad_recon, kl_weight)``: three losses of shape
        ``(B,)`` or ``()`` in float32 (float64 if any of recon/mu/logvar is), the gradient
        of the reduced recon term for an upstream 1 (contiguous, recon's dtype) or an empty
        tensor, and the free bits' weights (``mu.shape[1:]``, loss dtype; ``(0,)`` without).
    """
    free = free_bits is not None
    if free and (reduction == 0 or free_bits.dim() != 0):
        raise ValueError(
            "vae_loss: free_bits must be 0-d, with reduction 1 (mean) or 2 (sum): they are a batch quantity; "
            f"got shape {tuple(free_bits.shape)} with reduction {reduction}"
        )
    if free and (free_bits.device != recon.device or not free_bits.is_floating_point()):
        raise ValueError(f"vae_loss: free_bits must be a floating tensor on {recon.device}, got {free_bits.dtype} on {free_bits.device}")
    acc = acc_dtype(recon, mu, logvar)
    B = recon.shape[0]
    x, D, stride_x = as_rows(recon)
    t, _, stride_t = as_rows(as_loadable(target))
    m, Z, stride_mu = as_rows(mu)
    lv, _, stride_lv = as_rows(logvar)
    pm, stride_pm_b, stride_pm_z = prior_operand(prior_mu, mu, "prior_mu")
    plv, stride_plv_b, stride_plv_z = prior_operand(prior_logvar, mu, "prior_logvar")
    grad = torch.empty(recon.shape, dtype=recon.dtype, device=recon.device) if compute_grad else None
    shape = (B,) if reduction == 0 else ()
    loss, rec, kl = (recon.new_empty(shape, dtype=acc) for _ in range(3))
    # Block sizes from the math dtype: float32 logits with float64 latents compute in float64.
    BLOCK, num_warps, C, n_blocks = row_config(B, D, math_itemsize(recon, acc))
    part = torch.empty((B, C), dtype=acc, device=recon.device)
    weight = recon.new_empty(mu.shape[1:] if free else (0,), dtype=acc)
    if free:  # the KL's column sums, by gaussian_kl's own kernel: the finalize applies lambda
        kl_part = recon.new_empty(mu.shape[1:], dtype=acc_dtype(mu, logvar))
    else:
        kl_part = torch.empty((B,), dtype=torch.float64, device=recon.device)
    s, s_stride = log_scale_operand(log_scale, recon, acc) if likelihood == 1 else (part, 0)
    with device_guard(recon):
        if free:
            kl_rows(mu, logvar, prior_mu, prior_logvar, kl_part, KL_COLUMNS)
        if B > 0:
            _vae_loss_fwd_kernel[(B, C)](
                x, t, grad if compute_grad else x, part, m, lv, kl_part,
                D, Z, stride_x, stride_t, stride_mu, stride_lv, B, n_blocks, s,
                pm, plv, stride_pm_b, stride_pm_z, stride_plv_b, stride_plv_z,
                LIKELIHOOD=likelihood, S_STRIDE=s_stride,
                HAS_PM=prior_mu is not None, HAS_PLV=prior_logvar is not None,
                FROM_LOGITS=from_logits, COMPUTE_GRAD=compute_grad, MEAN=reduction == 1, KL_ROWS=not free,
                BLOCK=BLOCK, BLOCK_Z=_block_z(Z, num_warps, math_itemsize(mu, acc)), num_warps=num_warps,
            )
        finalize(part, kl_part, beta, loss, rec, kl, reduction, free_bits, weight if free else None)
    return loss, rec, kl, grad if compute_grad else recon.new_empty((0,)), weight


def vae_loss_backward_(
    grad_recon, grad_loss, grad_recon_term, grad_kl_term, recon, target, log_scale, mu, logvar, prior_mu,
    prior_logvar, kl_weight, beta, likelihood: int, from_logits: bool, reduction: int,
):
    """Backward of the fused loss (schema ``vaekern_triton::vae_loss_backward_``).

    Args:
        grad_recon: ``[B, ...]`` the forward's saved gradient, scaled in place; may be
            empty (numel 0) when recon needs no gradient.
        grad_loss, grad_recon_term, grad_kl_term: ``()`` or ``(B,)`` upstream gradients.
        recon, target, log_scale: the forward's, read only to recompute float16 gradient
            elements outside float16's normal range (``_common._scale_row_chunk``).
        mu, logvar, prior_mu, prior_logvar: the forward's latents and prior.
        kl_weight: None, or the forward's free-bits weights (``mu.shape[1:]``): element j's
            KL gradient is 0 where its weight is 0, else the scale's.
        beta: the forward's 0-d KL weight.
        likelihood, from_logits, reduction: the forward's.

    Returns:
        ``(grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar)`` as
        ``gaussian_kl_backward`` returns them.
    """
    B = mu.shape[0]
    m, Z, stride_mu = as_rows(mu)
    lv, _, stride_lv = as_rows(logvar)
    pm, stride_pm_b, stride_pm_z = prior_operand(prior_mu, mu, "prior_mu")
    plv, stride_plv_b, stride_plv_z = prior_operand(prior_logvar, mu, "prior_logvar")
    if kl_weight is not None:
        if reduction == 0 or kl_weight.shape != mu.shape[1:]:
            raise ValueError(
                f"vae_loss_backward_: kl_weight must have mu.shape[1:] = {tuple(mu.shape[1:])} with reduction 1 "
                f"or 2, got shape {tuple(kl_weight.shape)} with reduction {reduction}"
            )
        if kl_weight.device != mu.device or not kl_weight.is_floating_point():
            raise ValueError(
                f"vae_loss_backward_: kl_weight must be a floating tensor on {mu.device}, got {kl_weight.dtype} on "
                f"{kl_weight.device}"
            )
        kl_weight = kl_weight.contiguous().view(-1)  # read at unit stride
    gmu = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    glv = torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device)
    gpm, gplv = prior_grad_like(prior_mu, mu), prior_grad_like(prior_logvar, mu)
    if grad_recon.numel():
        if not grad_recon.is_contiguous():
            raise ValueError("vae_loss_backward_: grad_recon must be the contiguous saved gradient")
        D = grad_recon.numel() // B
        x, t, stride_x, stride_t, recompute = recompute_operands(grad_recon, recon, target)
        # Blocks sized as for float64 math (4 values per thread) where a float16 gradient may
        # be recomputed by the continuous Bernoulli beside the KL: at float16's block (16 per
        # thread) its probability form spilled 24 bytes on sm_80 (tests/test_triton_aot.py).
        itemsize = 8 if recompute and likelihood == 2 else grad_recon.element_size()
        BLOCK, num_warps, C, n_blocks = row_config(B, D, itemsize)
        loss_dtype = acc_dtype(recon, mu, logvar)
        s, s_stride = log_scale_operand(log_scale, recon, loss_dtype) if recompute and likelihood == 1 else (x, 0)
    else:
        grad_recon, D, BLOCK, num_warps, C, n_blocks = gmu, 0, 128, 4, 1, 1
        x, t, stride_x, stride_t, recompute = gmu, gmu, 0, 0, False
        s, s_stride = gmu, 0
    if B > 0:
        with device_guard(mu):
            _vae_loss_bwd_kernel[(B, C)](
                grad_recon, grad_loss, grad_recon_term, grad_kl_term, beta, m, lv, gmu, glv,
                pm, plv, gpm if prior_mu is not None else gmu, gplv if prior_logvar is not None else glv,
                stride_pm_b, stride_pm_z, stride_plv_b, stride_plv_z,
                D, Z, scale_stride(grad_loss), scale_stride(grad_recon_term), scale_stride(grad_kl_term),
                stride_mu, stride_lv, B, n_blocks, x, t, stride_x, stride_t, s,
                kl_weight if kl_weight is not None else gmu,
                LIKELIHOOD=likelihood, S_STRIDE=s_stride, HAS_PM=prior_mu is not None,
                HAS_PLV=prior_logvar is not None, FROM_LOGITS=from_logits, MEAN=reduction == 1,
                FREE_BITS=kl_weight is not None, RECOMPUTE=recompute, BLOCK=BLOCK, num_warps=num_warps,
                BLOCK_Z=_block_z(Z, num_warps, math_itemsize(mu, grad_loss.dtype)),
            )
    return gmu, glv, gpm, gplv
