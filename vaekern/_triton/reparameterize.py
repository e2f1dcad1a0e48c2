"""Reparameterization trick: ``vaekern_triton::reparameterize`` and its backward.

Math, per latent: ``z = mu + exp(lv / 2) * eps``; backward ``d/dmu = g``,
``d/dlv = g * 0.5 * exp(lv / 2) * eps`` for the upstream gradient ``g``. No clamp
(``exp(lv/2)`` overflows float32 only above lv = 177), as in ``vaekern.reference``.

Noise: either ``eps`` is given, or ``seed`` is, an int64 tensor of shape (1,) on the
device (drawn from the torch generator by ``vaekern.functional``). The kernel reads the
seed with ``tl.load`` (no host sync, CUDA-graph safe) and draws
``eps = tl.randn(seed, row * Z + col)``: Philox 4x32-10 keyed by the 64-bit seed, counter
= the element's index in the contiguous [B, Z] layout, Box-Muller to one float32 normal.
The backward regenerates exactly the same eps from the seed: nothing is saved but the
seed, and ``reparameterize(zeros, zeros, None, seed)`` returns that eps itself (the
double-backward path of ``vaekern._ops.reparameterize`` relies on it; exp(0) = 1 exactly).

Dtypes: mu, logvar (and eps) float16, bfloat16, float32, float64, all the same; math in
float32 (float64 for float64; the generated noise itself is float32, as the reference's
``torch.randn(dtype=float32)``); outputs in mu's dtype, contiguous.

Saved for backward (by ``vaekern._ops.reparameterize``): mu, logvar, and eps or the seed.

Limits: B * Z below 2**31 with a seed (32-bit Philox counters). Latents are read in place
at any row stride; other layouts are copied first. A given seed gives the same noise on
every GPU run, but not the same as the reference backend's ``torch.randn``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vaekern._triton._common import as_rows, device_guard, latent_config


@triton.jit
def _reparameterize_fwd_kernel(
    mu_ptr,  # [B, Z] posterior means, row stride stride_mu, unit column stride
    lv_ptr,  # [B, Z] log-variances, row stride stride_lv
    eps_ptr,  # [B, Z] standard normal noise, row stride stride_eps (HAS_EPS)
    seed_ptr,  # [1] int64 Philox seed (not HAS_EPS)
    z_ptr,  # [B, Z] contiguous, mu's dtype: the sample
    B,  # rows
    Z,  # latents per row
    stride_mu,  # row stride of mu, in elements
    stride_lv,  # row stride of logvar, in elements
    stride_eps,  # row stride of eps, in elements
    HAS_EPS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_Z: tl.constexpr,
):
    ACC = tl.float64 if mu_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # int32: Philox counters
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    if not HAS_EPS:
        seed = tl.load(seed_ptr)
    for z0 in range(0, Z, BLOCK_Z):
        cols = z0 + tl.arange(0, BLOCK_Z)
        m = rmask[:, None] & (cols < Z)[None, :]
        mu = tl.load(mu_ptr + rows64[:, None] * stride_mu + cols[None, :], mask=m, other=0.0).to(ACC)
        lv = tl.load(lv_ptr + rows64[:, None] * stride_lv + cols[None, :], mask=m, other=0.0).to(ACC)
        if HAS_EPS:
            eps = tl.load(eps_ptr + rows64[:, None] * stride_eps + cols[None, :], mask=m, other=0.0).to(ACC)
        else:
            eps = tl.randn(seed, rows[:, None] * Z + cols[None, :]).to(ACC)
        z = mu + tl.exp(0.5 * lv) * eps
        tl.store(z_ptr + rows64[:, None] * Z + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=m)


@triton.jit
def _reparameterize_bwd_kernel(
    gz_ptr,  # [B, Z] upstream gradient of z, row stride stride_gz
    lv_ptr,  # [B, Z] log-variances, row stride stride_lv
    eps_ptr,  # [B, Z] the forward's noise, row stride stride_eps (HAS_EPS)
    seed_ptr,  # [1] int64 the forward's Philox seed (not HAS_EPS)
    gmu_ptr,  # [B, Z] contiguous, mu's dtype: d/dmu = grad_z
    glv_ptr,  # [B, Z] contiguous, logvar's dtype: d/dlogvar
    B,  # rows
    Z,  # latents per row
    stride_gz,  # row stride of grad_z, in elements
    stride_lv,  # row stride of logvar, in elements
    stride_eps,  # row stride of eps, in elements
    HAS_EPS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_Z: tl.constexpr,
):
    ACC = tl.float64 if lv_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # int32: Philox counters
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    if not HAS_EPS:
        seed = tl.load(seed_ptr)
    for z0 in range(0, Z, BLOCK_Z):
        cols = z0 + tl.arange(0, BLOCK_Z)
        m = rmask[:, None] & (cols < Z)[None, :]
        gz = tl.load(gz_ptr + rows64[:, None] * stride_gz + cols[None, :], mask=m, other=0.0)
        lv = tl.load(lv_ptr + rows64[:, None] * stride_lv + cols[None, :], mask=m, other=0.0).to(ACC)
        if HAS_EPS:
            eps = tl.load(eps_ptr + rows64[:, None] * stride_eps + cols[None, :], mask=m, other=0.0).to(ACC)
        else:
            eps = tl.randn(seed, rows[:, None] * Z + cols[None, :]).to(ACC)
        g_lv = gz.to(ACC) * (0.5 * tl.exp(0.5 * lv)) * eps
        out = rows64[:, None] * Z + cols[None, :]
        tl.store(gmu_ptr + out, gz.to(gmu_ptr.dtype.element_ty), mask=m)
        tl.store(glv_ptr + out, g_lv.to(glv_ptr.dtype.element_ty), mask=m)


def _check_counters(B: int, Z: int, seed) -> None:
    if seed is not None and B * Z >= 2**31:
        raise ValueError(f"reparameterize (triton): B * Z = {B * Z} latents need 64-bit Philox counters; pass eps")


def reparameterize(mu, logvar, eps, seed):
    """``z = mu + exp(logvar / 2) * eps`` (schema ``vaekern_triton::reparameterize``).

    Args:
        mu: ``[B, ...]`` posterior means.
        logvar: ``[B, ...]`` log-variances, same shape and dtype.
        eps: ``[B, ...]`` standard normal noise, or None to draw it from ``seed``.
        seed: ``(1,)`` int64 Philox seed on mu's device, or None when eps is given.

    Returns:
        ``z``, contiguous, with mu's shape and dtype.
    """
    if (eps is None) == (seed is None):
        raise ValueError("reparameterize: pass exactly one of eps and seed")
    B = mu.shape[0]
    m, Z, stride_mu = as_rows(mu)
    lv, _, stride_lv = as_rows(logvar)
    e, _, stride_eps = as_rows(eps) if eps is not None else (m, Z, stride_mu)
    _check_counters(B, Z, seed)
    z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    BLOCK_B, BLOCK_Z, num_warps = latent_config(B, Z, mu.element_size())
    if B > 0:
        with device_guard(mu):
            _reparameterize_fwd_kernel[(triton.cdiv(B, BLOCK_B),)](
                m, lv, e, seed if seed is not None else m, z,
                B, Z, stride_mu, stride_lv, stride_eps,
                HAS_EPS=eps is not None, BLOCK_B=BLOCK_B, BLOCK_Z=BLOCK_Z, num_warps=num_warps,
            )
    return z


def reparameterize_backward(grad_z, mu, logvar, eps, seed):
    """Gradients of ``z`` (schema ``vaekern_triton::reparameterize_backward``).

    Args:
        grad_z: ``[B, ...]`` upstream gradient of z.
        mu, logvar, eps, seed: the forward's inputs; the noise is regenerated from seed.

    Returns:
        ``(grad_mu, grad_logvar)``: a contiguous copy of grad_z in mu's dtype, and
        ``grad_z * 0.5 * exp(logvar / 2) * eps`` in logvar's dtype.
    """
    if (eps is None) == (seed is None):
        raise ValueError("reparameterize_backward: pass exactly one of eps and seed")
    B = mu.shape[0]
    gz, Z, stride_gz = as_rows(grad_z)
    lv, _, stride_lv = as_rows(logvar)
    e, _, stride_eps = as_rows(eps) if eps is not None else (lv, Z, stride_lv)
    _check_counters(B, Z, seed)
    gmu = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    glv = torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device)
    BLOCK_B, BLOCK_Z, num_warps = latent_config(B, Z, mu.element_size())
    if B > 0:
        with device_guard(mu):
            _reparameterize_bwd_kernel[(triton.cdiv(B, BLOCK_B),)](
                gz, lv, e, seed if seed is not None else lv, gmu, glv,
                B, Z, stride_gz, stride_lv, stride_eps,
                HAS_EPS=eps is not None, BLOCK_B=BLOCK_B, BLOCK_Z=BLOCK_Z, num_warps=num_warps,
            )
    return gmu, glv
