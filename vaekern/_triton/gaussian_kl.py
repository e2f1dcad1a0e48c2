"""Analytic Gaussian KL to a diagonal Gaussian prior: ``vaekern_triton::gaussian_kl`` and
its backward.

Math, per latent, with the prior N(pm, exp(plv)) (0 where absent), standardized on load
(``_common._prior_standardized``): ``m = (mu - pm) * exp(-plv / 2)``, ``l = lv - plv`` and
``v = exp(min(l, 60))`` (60 is ``_common.LOGVAR_MAX``; ``vaekern.reference``):

* forward:  ``kl = 0.5 * (m^2 + v - 1 - l)``, summed over every dim but the first.
* backward: ``g_m = s * m``, ``g_l = s * 0.5 * (v - 1)`` (the straight-through clamp:
  the clamped variance keeps its sign and size), with the row scale ``s = grad_out[b]``
  for none, ``grad_out`` for sum and ``grad_out / B`` for mean; ``d/dmu = g_m *
  exp(-plv / 2)``, ``d/dlv = g_l``, and per element ``d/dpm = -d/dmu``, ``d/dplv = -g_l -
  0.5 * g_m * m`` (``_common._prior_kl_grads``; the caller sums them over the prior's
  broadcast dims).

One launch each way over ``[BLOCK_B, BLOCK_Z]`` tiles (rows x latents, the program loops
over latent blocks). The forward writes one value per row for none; for mean/sum one
program walks every row in a fixed order and writes the scalar (deterministic, no
atomics). Above ``SINGLE_PROGRAM_MAX`` latents that single program would be slow, so
per-row programs run first and ``_finalize_kernel`` reduces their rows (two launches).
For ``KL_COLUMNS`` (the per-element batch sums of free bits) each program owns a block of
latent columns and walks every row in a fixed order; its backward reads one scale per
column instead of per row.

Dtypes: mu and logvar float16, bfloat16, float32, float64 (the same for both); math in
float32 (float64 for float64); the KL is float32/float64, gradients in mu's dtype.
``min(lv, 60)`` propagates NaN; logvar in [-100, 100] neither overflows nor NaNs.

Saved for backward (by ``vaekern._ops.gaussian_kl``): mu, logvar and the priors, which are
latent-sized or smaller; the backward recomputes ``exp`` rather than keeping a variance
buffer.

Limits: latents are read in place at any row stride (``h.chunk(2, dim=1)`` halves);
other layouts are copied first. A prior is read in place at its broadcast strides
(``_common.prior_operand``), in the math dtype; ``m`` is formed in it, so
``|mu - pm| * exp(-plv / 2)`` beyond float32 is inf for float32 math. Meant for
latent-sized rows (tens to thousands).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vaekern._ops._common import KL_COLUMNS, acc_dtype, prior_grad_like
from vaekern._triton._common import (
    _gaussian_kl_elem,
    _prior_kl_grads,
    _prior_standardized,
    as_rows,
    device_guard,
    finalize,
    latent_config,
    math_itemsize,
    prior_operand,
    scale_stride,
)

# Up to this many latents a mean/sum is one launch of one program (about 2 MB of
# float32 mu and logvar); beyond it, per-row programs plus _finalize_kernel.
SINGLE_PROGRAM_MAX = 1 << 18


@triton.jit
def _kl_block(
    mu_ptr, lv_ptr, pm_ptr, plv_ptr, rows, cols, m,
    stride_mu, stride_lv, stride_pm_b, stride_pm_z, stride_plv_b, stride_plv_z,
    ACC: tl.constexpr, HAS_PM: tl.constexpr, HAS_PLV: tl.constexpr,
):  # fmt: skip
    """Twice the KL to the prior of the latents at ``rows`` x ``cols`` (a [BLOCK_B, BLOCK_Z]
    block), in ACC, 0 off the mask ``m``: what every reduction of the forward sums."""
    mu = tl.load(mu_ptr + rows[:, None] * stride_mu + cols[None, :], mask=m, other=0.0).to(ACC)
    lv = tl.load(lv_ptr + rows[:, None] * stride_lv + cols[None, :], mask=m, other=0.0).to(ACC)
    mu, lv = _prior_standardized(
        mu, lv,
        pm_ptr + rows[:, None] * stride_pm_b + cols[None, :] * stride_pm_z,
        plv_ptr + rows[:, None] * stride_plv_b + cols[None, :] * stride_plv_z,
        m, HAS_PM, HAS_PLV,
    )  # fmt: skip
    return tl.where(m, _gaussian_kl_elem(mu, lv), 0.0)


@triton.jit
def _gaussian_kl_fwd_kernel(
    mu_ptr,  # [B, Z] posterior means, row stride stride_mu, unit column stride
    lv_ptr,  # [B, Z] posterior log-variances, row stride stride_lv
    out_ptr,  # [B] (REDUCTION 0), [] or [Z] (REDUCTION 3) acc dtype: KL per row, reduced, or per column
    pm_ptr,  # [B, Z] acc dtype: prior means at strides (stride_pm_b, stride_pm_z) (HAS_PM)
    plv_ptr,  # [B, Z] acc dtype: prior log-variances, likewise (HAS_PLV)
    B,  # rows
    Z,  # latents per row
    stride_mu,  # row stride of mu, in elements
    stride_lv,  # row stride of logvar, in elements
    stride_pm_b,  # the prior mean's row and column strides (0 along a broadcast dim)
    stride_pm_z,
    stride_plv_b,  # likewise for the prior log-variance
    stride_plv_z,
    REDUCTION: tl.constexpr,  # 0: grid cdiv(B, BLOCK_B), one value per row; 1 mean, 2 sum: grid 1;
    # 3 (KL_COLUMNS): grid cdiv(Z, BLOCK_Z), one value per latent column, summed over rows
    HAS_PM: tl.constexpr,
    HAS_PLV: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_Z: tl.constexpr,
):
    ACC = out_ptr.dtype.element_ty
    offs_b = tl.arange(0, BLOCK_B)
    offs_z = tl.arange(0, BLOCK_Z)
    if REDUCTION == 0:
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + offs_b
        rmask = rows < B
        acc = tl.zeros([BLOCK_B, BLOCK_Z], dtype=ACC)
        for z0 in range(0, Z, BLOCK_Z):
            cols = z0 + offs_z
            m = rmask[:, None] & (cols < Z)[None, :]
            acc += _kl_block(
                mu_ptr, lv_ptr, pm_ptr, plv_ptr, rows, cols, m,
                stride_mu, stride_lv, stride_pm_b, stride_pm_z, stride_plv_b, stride_plv_z, ACC, HAS_PM, HAS_PLV,
            )  # fmt: skip
        tl.store(out_ptr + rows, 0.5 * tl.sum(acc, axis=1), mask=rmask)
    elif REDUCTION == 3:
        # This program's columns, every row in a fixed order: deterministic.
        cols = tl.program_id(0) * BLOCK_Z + offs_z
        cmask = cols < Z
        acc = tl.zeros([BLOCK_B, BLOCK_Z], dtype=ACC)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + offs_b.to(tl.int64)
            m = (rows < B)[:, None] & cmask[None, :]
            acc += _kl_block(
                mu_ptr, lv_ptr, pm_ptr, plv_ptr, rows, cols, m,
                stride_mu, stride_lv, stride_pm_b, stride_pm_z, stride_plv_b, stride_plv_z, ACC, HAS_PM, HAS_PLV,
            )  # fmt: skip
        tl.store(out_ptr + cols, 0.5 * tl.sum(acc, axis=0), mask=cmask)
    else:
        # One program walks every row in a fixed order: one launch, deterministic.
        acc = tl.zeros([BLOCK_B, BLOCK_Z], dtype=ACC)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + offs_b.to(tl.int64)
            rmask = rows < B
            for z0 in range(0, Z, BLOCK_Z):
                cols = z0 + offs_z
                m = rmask[:, None] & (cols < Z)[None, :]
                acc += _kl_block(
                    mu_ptr, lv_ptr, pm_ptr, plv_ptr, rows, cols, m,
                    stride_mu, stride_lv, stride_pm_b, stride_pm_z, stride_plv_b, stride_plv_z, ACC, HAS_PM, HAS_PLV,
                )  # fmt: skip
        total = 0.5 * tl.sum(tl.sum(acc, axis=1), axis=0)
        if REDUCTION == 1:
            total = total / B
        tl.store(out_ptr, total)


@triton.jit
def _gaussian_kl_bwd_kernel(
    go_ptr,  # [B] or [] fp32/fp64: upstream gradient of the reduced KL ([Z] for COLUMNS)
    mu_ptr,  # [B, Z] posterior means, row stride stride_mu
    lv_ptr,  # [B, Z] posterior log-variances, row stride stride_lv
    gmu_ptr,  # [B, Z] contiguous, mu's dtype: d/dmu
    glv_ptr,  # [B, Z] contiguous, logvar's dtype: d/dlogvar
    pm_ptr,  # [B, Z] prior means at strides (stride_pm_b, stride_pm_z) (HAS_PM)
    plv_ptr,  # [B, Z] prior log-variances, likewise (HAS_PLV)
    gpm_ptr,  # [B, Z] contiguous, the prior's dtype: d/dprior_mu per element (HAS_PM)
    gplv_ptr,  # [B, Z] contiguous, likewise: d/dprior_logvar (HAS_PLV)
    B,  # rows
    Z,  # latents per row
    stride_go,  # 0 for a scalar grad_out, else its stride (between rows, or columns for COLUMNS)
    stride_mu,  # row stride of mu, in elements
    stride_lv,  # row stride of logvar, in elements
    stride_pm_b,  # the prior mean's row and column strides (0 along a broadcast dim)
    stride_pm_z,
    stride_plv_b,  # likewise for the prior log-variance
    stride_plv_z,
    MEAN: tl.constexpr,
    COLUMNS: tl.constexpr,  # one upstream per latent column (KL_COLUMNS), not per row
    HAS_PM: tl.constexpr,
    HAS_PLV: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_Z: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    if not COLUMNS:
        s_row = tl.load(go_ptr + rows * stride_go, mask=rmask, other=0.0)
        if MEAN:
            s_row = s_row / B
    for z0 in range(0, Z, BLOCK_Z):
        cols = z0 + tl.arange(0, BLOCK_Z)
        m = rmask[:, None] & (cols < Z)[None, :]
        if COLUMNS:
            s = tl.load(go_ptr + cols * stride_go, mask=cols < Z, other=0.0)[None, :]
        else:
            s = s_row[:, None]
        mu = tl.load(mu_ptr + rows[:, None] * stride_mu + cols[None, :], mask=m, other=0.0)
        lv = tl.load(lv_ptr + rows[:, None] * stride_lv + cols[None, :], mask=m, other=0.0)
        # s is fp32 or fp64: the math runs in it, whatever mu's dtype.
        out = rows[:, None] * Z + cols[None, :]
        g_mu, g_lv = _prior_kl_grads(
            s, mu.to(s.dtype), lv.to(s.dtype),
            pm_ptr + rows[:, None] * stride_pm_b + cols[None, :] * stride_pm_z,
            plv_ptr + rows[:, None] * stride_plv_b + cols[None, :] * stride_plv_z,
            gpm_ptr + out, gplv_ptr + out, m, HAS_PM, HAS_PLV,
        )  # fmt: skip
        tl.store(gmu_ptr + out, g_mu.to(gmu_ptr.dtype.element_ty), mask=m)
        tl.store(glv_ptr + out, g_lv.to(glv_ptr.dtype.element_ty), mask=m)


def kl_rows(mu, logvar, prior_mu, prior_logvar, out, reduction: int = 0) -> None:
    """The KL of ``[B, ...]`` latents to the prior (each part None for 0): per row into
    ``out`` of shape ``(B,)`` for reduction 0, per latent column into ``out`` of
    ``mu.shape[1:]`` for 3 (``KL_COLUMNS``), else reduced into the 0-d ``out`` by a single
    program."""
    B = mu.shape[0]
    m, Z, stride_mu = as_rows(mu)
    lv, _, stride_lv = as_rows(logvar)
    pm, stride_pm_b, stride_pm_z = prior_operand(prior_mu, mu, "prior_mu")
    plv, stride_plv_b, stride_plv_z = prior_operand(prior_logvar, mu, "prior_logvar")
    if reduction == KL_COLUMNS:  # with no rows there are still columns, each summing to 0
        Z = math.prod(mu.shape[1:])
    BLOCK_B, BLOCK_Z, num_warps = latent_config(B, Z, mu.element_size())
    grid = {0: (triton.cdiv(B, BLOCK_B),), KL_COLUMNS: (triton.cdiv(Z, BLOCK_Z),)}.get(reduction, (1,))
    if grid[0] > 0:
        _gaussian_kl_fwd_kernel[grid](
            m, lv, out, pm, plv, B, Z, stride_mu, stride_lv, stride_pm_b, stride_pm_z, stride_plv_b, stride_plv_z,
            REDUCTION=reduction, HAS_PM=prior_mu is not None, HAS_PLV=prior_logvar is not None,
            BLOCK_B=BLOCK_B, BLOCK_Z=BLOCK_Z, num_warps=num_warps,
        )


def kl_grads(scale, mu, logvar, prior_mu, prior_logvar, reduction: int, gmu, glv, gpm, gplv) -> None:
    """Write ``scale``-weighted KL gradients into the contiguous ``gmu``, ``glv`` and, for
    the priors present, ``gpm``, ``gplv`` (per element)."""
    B = mu.shape[0]
    m, Z, stride_mu = as_rows(mu)
    lv, _, stride_lv = as_rows(logvar)
    pm, stride_pm_b, stride_pm_z = prior_operand(prior_mu, mu, "prior_mu")
    plv, stride_plv_b, stride_plv_z = prior_operand(prior_logvar, mu, "prior_logvar")
    # The math runs in scale's dtype: float64 for vae_loss's float64 recon with float32 latents.
    BLOCK_B, BLOCK_Z, num_warps = latent_config(B, Z, math_itemsize(mu, scale.dtype))
    if B > 0:
        if reduction == KL_COLUMNS:  # one scale per latent column, as a flat [Z] view
            scale = scale.reshape(Z)
        _gaussian_kl_bwd_kernel[(triton.cdiv(B, BLOCK_B),)](
            scale, m, lv, gmu, glv, pm, plv, gpm if prior_mu is not None else gmu,
            gplv if prior_logvar is not None else glv,
            B, Z, scale_stride(scale), stride_mu, stride_lv, stride_pm_b, stride_pm_z, stride_plv_b, stride_plv_z,
            MEAN=reduction == 1, COLUMNS=reduction == KL_COLUMNS,
            HAS_PM=prior_mu is not None, HAS_PLV=prior_logvar is not None,
            BLOCK_B=BLOCK_B, BLOCK_Z=BLOCK_Z, num_warps=num_warps,
        )


def gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction: int):
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) (schema ``vaekern_triton::gaussian_kl``).

    Args:
        mu: ``[B, ...]`` posterior means.
        logvar: ``[B, ...]`` log-variances, same shape and dtype.
        prior_mu, prior_logvar: None (0), or broadcasting to mu, in the math dtype.
        reduction: 0 none, 1 mean, 2 sum, 3 the batch sum of each latent element.

    Returns:
        Shape ``(B,)``, ``()`` or ``mu.shape[1:]``, float32 (float64 for float64 inputs).
    """
    acc = acc_dtype(mu, logvar)
    B = mu.shape[0]
    shape = {0: (B,), KL_COLUMNS: mu.shape[1:]}.get(reduction, ())
    out = mu.new_empty(shape, dtype=acc)
    with device_guard(mu):
        if reduction in (0, KL_COLUMNS) or mu.numel() <= SINGLE_PROGRAM_MAX:
            kl_rows(mu, logvar, prior_mu, prior_logvar, out, reduction)
        else:
            rows = mu.new_empty((B,), dtype=acc)
            kl_rows(mu, logvar, prior_mu, prior_logvar, rows)
            finalize(rows.view(B, 1), None, None, out, None, None, reduction)
    return out


def gaussian_kl_backward(grad_out, mu, logvar, prior_mu, prior_logvar, reduction: int):
    """Gradients of the reduced KL (schema ``vaekern_triton::gaussian_kl_backward``).

    Args:
        grad_out: ``()`` or ``(B,)`` upstream gradient (``mu.shape[1:]`` for reduction 3),
            float32/float64.
        mu, logvar, prior_mu, prior_logvar: the forward's inputs.
        reduction: 0 none, 1 mean, 2 sum, 3 the batch sum of each latent element.

    Returns:
        ``(grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar)``, contiguous, in mu's,
        logvar's and the priors' dtypes; the priors' per element (mu's shape), or ``(0,)``
        for an absent prior.
    """
    gmu = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    glv = torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device)
    gpm, gplv = prior_grad_like(prior_mu, mu), prior_grad_like(prior_logvar, mu)
    with device_guard(mu):
        kl_grads(grad_out, mu, logvar, prior_mu, prior_logvar, reduction, gmu, glv, gpm, gplv)
    return gmu, glv, gpm, gplv
