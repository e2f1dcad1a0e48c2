"""Pieces shared by the Triton kernels: element math, the row machinery, the partials
reduction, launch helpers.

Element math (``@triton.jit`` helpers, inlined into the kernels)
--------------------------------------------------------------
* ``_log1p(x) = log(u) * x / (u - 1)`` with ``u = 1 + x``, and ``x`` itself where ``u``
  rounds to 1 (Goldberg's trick, "What every computer scientist should know about
  floating-point arithmetic", thm. 4). ``tl.log1p`` needs libdevice, which the
  interpreter cannot run; this form needs one ``log`` and one division, and with an
  exactly rounded ``log`` it is accurate to about 5 ulp of ``log1p(x)`` for x >= -0.5 (the
  naive ``log(1 + x)`` loses every digit of ``log1p(1e-8)``). With the GPU's fast log
  (``lg2.approx.f32``, absolute error about 2^-22 near 1) a term ``log1p(e)`` with tiny
  ``e`` carries an absolute error below about 1e-7, which is what matters in a row sum.
* ``_expm1(x) = (u - 1) * x / log(u)`` with ``u = exp(x)`` (Kahan), for the KL's
  ``exp(lv) - 1`` near lv = 0, likewise without libdevice.
* ``_bernoulli_logits_elem`` and ``_bernoulli_probs_elem``: the likelihoods' element
  functions (below); see ``bernoulli_nll.py`` for the math. One ``exp`` and one ``log``
  per logit; the sigmoid reuses the same ``exp(-|x|)``, and ``sigmoid(x) - t`` is formed
  so that it does not cancel (see the comment there).
* ``_gaussian_elem`` (issue 13): the Gaussian NLL with a per-column log standard deviation,
  see ``gaussian_nll.py``. ``_continuous_bernoulli_logits_elem`` and
  ``_continuous_bernoulli_probs_elem``: the Bernoulli's element math (the probability form
  through ``_bce_probs_terms`` and ``_bce_grad_den``, which ``_bernoulli_probs_elem`` uses
  too) plus the log normalizer ``_cb_log_norm``, see ``continuous_bernoulli_nll.py``.
* ``_gaussian_kl_elem`` (with its part without mu, ``_kl_var_elem``) and ``_kl_grad_lv``:
  the KL to N(0, I) and its logvar gradient, shared by ``gaussian_kl.py`` and ``vae_loss.py``;
  ``_prior_standardized`` takes a diagonal Gaussian prior to it on load, and
  ``_prior_kl_grads`` gives the gradients with the prior's, read at the broadcast strides of
  ``prior_operand``.
* Every clamp passes ``propagate_nan=ALL``: ``tl.maximum``/``tl.minimum`` otherwise
  return the other operand for a NaN, and a NaN input must give a NaN loss.
* The limits ``LOGVAR_MAX``, ``BCE_LOG_MIN``, ``BCE_GRAD_EPS`` and the continuous
  Bernoulli's series thresholds ``CB_SERIES_MAX_F32``/``_F64`` are defined here once, with
  the values of ``vaekern.reference``; kernels read their ``tl.constexpr`` copies.

Adding a likelihood (the extension point)
-----------------------------------------
A likelihood is one ``@triton.jit`` element function ``elem(x, t) -> (value, grad)``:
``x`` the input and ``t`` the target, blocks already converted to the accumulation dtype
(float32, or float64 for float64 math); ``value`` its negative log-likelihood and
``grad = d value / dx``, both in that dtype, NaN wherever an input is NaN (masked-off
lanes see x = 0.5, t = 0, and their results are discarded). Use ``tl.full([], c,
x.dtype)`` for a constant that float32 cannot hold exactly: a bare float literal is a
float32 constant. Write it here, next to the Bernoulli ones, with its reference in
``vaekern/reference.py``; a kernel then passes it, as a compile-time constant, to
``_loss_row_chunk``, which owns everything else: the column tiling and masking, the
loads in each tensor's own width, the per-row partial sum, the gradient's ``/B`` for
mean and its store in the input's dtype. Row scaling in the backward
(``_scale_row_chunk``), the deterministic finalize and the fused KL do not depend on the
likelihood. A kernel picks the function with a compile-time branch, as in
``ELEM: tl.constexpr = _bernoulli_logits_elem if FROM_LOGITS else _bernoulli_probs_elem``;
checked with triton 3.8 (2026-11-30), it compiles for sm_80/sm_90 to the same PTX as
the function inlined by hand, and runs under ``TRITON_INTERPRET=1`` (a JIT function as an
argument of another needs triton PR 5723, January 2025).

A likelihood with a parameter per column of the row (the Gaussian's log_scale) takes it as
a third operand, ``elem(x, t, p)``, with ``p`` in the accumulation dtype: the kernel passes
``p_row`` (the parameter's pointer, shared by every row) and ``P_STRIDE`` (a constexpr,
its column stride: 1, or 0 for one value) to ``_loss_row_chunk`` and ``_scale_row_chunk``.
Both default to None, which calls ``elem(x, t)``: the Bernoulli kernels pass neither, and
their PTX for sm_80/sm_90 is the same instructions as before the parameter existed
(checked with triton 3.8, 2026-11-30, on every AOT case of ``tests/test_triton_aot.py``).

Conversions, and Triton's interpreter
-------------------------------------
Every dtype change is a ``.to``. Compiled, bfloat16 widens with ``cvt.f32.bf16`` (exact,
subnormals kept) and narrows with ``cvt.rn`` (to nearest even); sm_80 has no
bfloat16/float64 cvt, so there float64 math stored as a bfloat16 gradient rounds twice,
through float32. Triton 3.8's interpreter gets three of these casts wrong: bfloat16
subnormals widen to wrong values, float64 narrows to bfloat16 through an integer, and
float32 narrows by truncation. That is the interpreter's fault, not this code's
(tests/test_triton_aot.py checks the PTX and each bare cast), and not worked around here.

Deterministic reduction
-----------------------
Forward kernels write one partial sum per (row, column chunk) into a ``[B, C]`` buffer,
each reduced inside its program by ``tl.sum`` over a fixed-shape block (a fixed tree).
``_finalize_kernel`` then sums the partials in a fixed order that depends on the shapes
only: two runs are bitwise equal, and there are no atomics.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl


# Programs the image-sized kernels aim for, by splitting long rows into column chunks
# when the batch alone is too small to fill the GPU (132 SMs x 8 resident programs on an
# H100). A constant, not a device query: the split, and so every rounding, depends on
# the shapes only.
TARGET_PROGRAMS = 1024
# Largest column block per loop step, in bytes of input: 16 KiB = 4096 fp32 = 16
# elements per thread at 8 warps, four 128-bit loads per tensor and step.
MAX_BLOCK_BYTES = 16384
# Column indices within a row are int32 (row offsets are int64): a row of the image-sized
# kernels holds fewer elements than this, so that a column plus one block never wraps.
MAX_ROW = 2**31 - 2**16

# Numeric limits, the same values as ``vaekern.reference`` (a test ties them together):
# the KL's clamp of logvar before exp, the clamp of each log of the probability NLL, and
# the floor of p*(1-p) in the probability gradient.
LOGVAR_MAX = 60.0
BCE_LOG_MIN = -100.0
BCE_GRAD_EPS = 1e-12
# The same limits as constexprs: a @triton.jit function reads a global only in this form
# (tl.constexpr(60.0) is not a float that Python code can compare or convert).
_LOGVAR_MAX = tl.constexpr(LOGVAR_MAX)
_BCE_LOG_MIN = tl.constexpr(BCE_LOG_MIN)
_BCE_GRAD_EPS = tl.constexpr(BCE_GRAD_EPS)
# The continuous Bernoulli's log normalizer takes its series below |eta| = CB_SERIES_MAX_*
# (by the math dtype; the float64 one is the reference's), its direct form above.
CB_SERIES_MAX_F32 = 0.5
CB_SERIES_MAX_F64 = 1e-2
_CB_SERIES_MAX_F32 = tl.constexpr(CB_SERIES_MAX_F32)
_CB_SERIES_MAX_F64 = tl.constexpr(CB_SERIES_MAX_F64)
# The Gaussian NLL's normalizing constant per element, 0.5 * log(2 pi), correctly rounded.
HALF_LOG_2PI = 0.91893853320467274178
_HALF_LOG_2PI = tl.constexpr(HALF_LOG_2PI)
# Constants of the math, as constexprs for tl.full in the math's dtype.
_LOG2 = tl.constexpr(0.69314718055994530942)


# ---- element math: helpers --------------------------------------------------------------


@triton.jit
def _log1p(x):
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / d))


@triton.jit
def _expm1(x):
    # Kahan's trick: (u - 1) * x / log(u) with u = exp(x) cancels the rounding of u; x itself
    # where u rounds to 1, and -1 where u - 1 does (x below about -17 in float32).
    u = tl.exp(x)
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.where(d == -1.0, d, d * (x / tl.log(u))))


# ---- element math: likelihoods (x, t) -> (nll, d nll / dx), see the module header --------


@triton.jit
def _bernoulli_logits_elem(x, t):
    """Bernoulli NLL of logit x: (max(x, 0) - x*t + log1p(exp(-|x|)), sigmoid(x) - t)."""
    e = tl.exp(-tl.abs(x))
    nll = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL) - x * t + _log1p(e)
    # sigmoid(x) - t = num / (1 + e), with num = (1 - t) - t*e for x >= 0 and
    # (e - t) - t*e below. Where sigmoid(x) and t nearly cancel, 1 - t (t near
    # sigmoid >= 1/2) and e - t (t near sigmoid in [e/2, e)) are exact by Sterbenz's
    # lemma and the fma rounds once, so the gradient keeps its relative accuracy
    # (sigmoid(x) - t rounded on its own loses up to 6e-8 absolute; for a binary
    # target and |x| = 10 that is a relative error of 1e-3).
    num = tl.fma(-t, e, tl.where(x >= 0.0, 1.0 - t, e - t))
    return nll, num / (1.0 + e)


@triton.jit
def _bce_probs_terms(x, t):
    """The Bernoulli NLL of probability x and its logs clamped at BCE_LOG_MIN:
    (-(t*log p + (1-t)*log q), log p, log q), shared with the continuous Bernoulli."""
    log_p = tl.maximum(tl.log(x), _BCE_LOG_MIN, propagate_nan=tl.PropagateNan.ALL)
    log_q = tl.maximum(_log1p(-x), _BCE_LOG_MIN, propagate_nan=tl.PropagateNan.ALL)
    return -(t * log_p + (1.0 - t) * log_q), log_p, log_q


@triton.jit
def _bce_grad_den(x):
    """max(x(1-x), BCE_GRAD_EPS): the probability gradient's denominator."""
    # The floor in the math's precision: a bare 1e-12 is a float32 constant
    # (9.99999996e-13), 4e-9 relative off in the float64 gradient at p = 0 or 1.
    eps = tl.full([], _BCE_GRAD_EPS, x.dtype)
    return tl.maximum(x * (1.0 - x), eps, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _bernoulli_probs_elem(x, t):
    """Bernoulli NLL of probability x, logs clamped at BCE_LOG_MIN:
    (-(t*log x + (1-t)*log1p(-x)), (x - t) / max(x(1-x), BCE_GRAD_EPS))."""
    nll, _, _ = _bce_probs_terms(x, t)
    return nll, (x - t) / _bce_grad_den(x)


@triton.jit
def _cb_log_norm(eta):
    """(L, dL/deta) for the continuous Bernoulli's L(eta) = -log(eta / tanh(eta/2)).

    Below |eta| = R, Taylor series in eta^2 (Horner); above, with a = |eta| and
    e = exp(-a): L = -log(a) + log1p(-e) - log1p(e) and
    L' = sign(eta) * (2e/(1 - e*e) - 1/a), which never overflows (a = inf gives L = -inf,
    L' = 0). R is chosen by the math dtype at compile time: 0.5 for float32 math, 1e-2
    for float64, where the series' truncation is below 1e-9 and far below 1e-16
    (issue 13's contract). Above R the direct L' cancels: 1/sinh(a) and 1/a agree to
    about a^2/6 of 1/a, and exp(-a)'s rounding reaches 1 - e*e magnified by about 1/(2a).
    Measured against mpmath in float64 just above R = 1e-2: 2.8e-13 absolute, 1.7e-10
    relative to L' = -1.7e-3 (the reference's formula has the same error; 1/sinh from
    expm1 would be 100x closer). In float32 just above 0.5: 4.4e-7 absolute."""
    R: tl.constexpr = _CB_SERIES_MAX_F64 if eta.dtype == tl.float64 else _CB_SERIES_MAX_F32
    F: tl.constexpr = eta.dtype  # the coefficients in the math's precision (see the header)
    a = tl.abs(eta)
    u = eta * eta
    norm_s = tl.full([], -73.0 / 34214400.0, F)
    norm_s = norm_s * u + tl.full([], 127.0 / 4838400.0, F)
    norm_s = norm_s * u + tl.full([], -31.0 / 90720.0, F)
    norm_s = norm_s * u + tl.full([], 7.0 / 1440.0, F)
    norm_s = norm_s * u + tl.full([], -1.0 / 12.0, F)
    norm_s = norm_s * u - tl.full([], _LOG2, F)
    d_s = tl.full([], -73.0 / 3421440.0, F)
    d_s = d_s * u + tl.full([], 127.0 / 604800.0, F)
    d_s = d_s * u + tl.full([], -31.0 / 15120.0, F)
    d_s = d_s * u + tl.full([], 7.0 / 360.0, F)
    d_s = d_s * u + tl.full([], -1.0 / 6.0, F)
    d_s = d_s * eta
    e = tl.exp(-a)
    norm_d = -tl.log(a) + _log1p(-e) - _log1p(e)
    # sign(eta) * (2e/(1 - e*e) - 1/a), bit for bit (negation is exact). In this form ptxas
    # keeps the float16 backward's recompute of the probability form in registers on sm_80
    # (the sign applied last spilled 4 bytes there).
    d_d = tl.where(eta < 0.0, -2.0 * e, 2.0 * e) / (1.0 - e * e) - 1.0 / eta
    series = a < R  # NaN takes the direct form, and gives NaN
    return tl.where(series, norm_s, norm_d), tl.where(series, d_s, d_d)


@triton.jit
def _continuous_bernoulli_logits_elem(x, t):
    """Continuous Bernoulli NLL of logit x: the Bernoulli's (softplus form, sigmoid(x) - t)
    plus the log normalizer (L(x), L'(x)) of ``_cb_log_norm``."""
    nll, grad = _bernoulli_logits_elem(x, t)
    norm, d_norm = _cb_log_norm(x)
    return nll + norm, grad + d_norm


@triton.jit
def _continuous_bernoulli_probs_elem(x, t):
    """Continuous Bernoulli NLL of probability x: the Bernoulli's clamped-log NLL plus L(eta)
    at eta = log p - log q (clamped logs: eta in [-100, 100], finite at x = 0 and 1), and
    the gradient (x - t + L'(eta)) / max(x(1-x), BCE_GRAD_EPS), since d eta/dx = 1/(x(1-x))."""
    nll, log_p, log_q = _bce_probs_terms(x, t)
    norm, d_norm = _cb_log_norm(log_p - log_q)
    return nll + norm, (x - t + d_norm) / _bce_grad_den(x)


@triton.jit
def _gaussian_elem(x, t, s):
    """Gaussian NLL of mean x, log standard deviation s:
    (0.5 (x - t)^2 exp(-2s) + s + 0.5 log(2 pi), (x - t) exp(-2s)).

    The square as (x - t) * grad: it overflows only where the gradient does. No clamp:
    exp(-2s) overflows below s = -44 in float32 math (-354 in float64). The fma rounds the
    quadratic term once; written as a multiply and two adds, ptxas spilled 12 bytes on
    sm_80 for a per-column float32 log_scale."""
    d = x - t
    grad = d * tl.exp(-2.0 * s)
    return tl.fma(0.5 * d, grad, s + tl.full([], _HALF_LOG_2PI, x.dtype)), grad


# ---- row machinery: column chunks of one row ----------------------------------------------


@triton.jit
def _chunk_bounds(chunk, n_blocks, D, BLOCK: tl.constexpr):
    """[lo, hi) of column chunk ``chunk``: n_blocks blocks, the last one cut at D.

    hi as lo + min(span, D - lo), never min(lo + span, D): the last chunk's lo + span can
    pass 2**31 for rows near MAX_ROW, and the wrapped int32 would skip the chunk."""
    span = n_blocks * BLOCK
    lo = chunk * span
    return lo, lo + tl.minimum(span, D - lo)


@triton.jit
def _loss_row_chunk(
    ELEM: tl.constexpr,  # the likelihood's element function, (x, t[, p]) -> (nll, d nll / dx)
    x_row,  # [D] pointer to this row of the input (unit column stride)
    t_row,  # [D] pointer to this row of the target
    g_row,  # [D] pointer to this row of the gradient output (COMPUTE_GRAD)
    lo,  # first column of the chunk, a multiple of BLOCK
    hi,  # one past its last column, <= D
    D,  # row length
    B,  # batch size: the gradient is divided by it for MEAN
    ACC: tl.constexpr,  # accumulation dtype
    COMPUTE_GRAD: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
    p_row=None,  # [D] or [] pointer to ELEM's per-column parameter (P_STRIDE not None)
    P_STRIDE: tl.constexpr = None,  # its column stride: 1, or 0 for one value; None: ELEM(x, t)
):
    """ELEM's NLL summed over columns [lo, hi) of one row; writes the gradient there."""
    cols0 = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=ACC)
    # One division per program, a multiply per element: an IEEE division per element
    # made ptxas 12.8 (triton 3.6) spill 40 bytes on sm_80 for float32 logits.
    inv_b = tl.full([], 1.0, ACC) / B
    for start in range(lo, hi, BLOCK):
        cols = start + cols0
        # Masking against D, not hi: chunk ends are multiples of BLOCK except the last,
        # and D's divisibility is what lets the compiler emit 128-bit accesses.
        mask = cols < D
        x = tl.load(x_row + cols, mask=mask, other=0.5).to(ACC)
        t = tl.load(t_row + cols, mask=mask, other=0).to(ACC)
        if P_STRIDE is None:
            nll, grad = ELEM(x, t)
        else:
            # P_STRIDE 0 loads one cached address per lane. Hoisting that load (and ELEM's
            # math on it) out of the loop made ptxas spill 28 bytes on sm_90 (Gaussian, fp32).
            nll, grad = ELEM(x, t, tl.load(p_row + cols * P_STRIDE, mask=mask, other=0).to(ACC))
        acc += tl.where(mask, nll, 0.0)
        if COMPUTE_GRAD:
            if MEAN:
                grad = grad * inv_b
            tl.store(g_row + cols, grad.to(g_row.dtype.element_ty), mask=mask)
    return tl.sum(acc, axis=0)


@triton.jit
def _scale_row_chunk(
    ELEM: tl.constexpr,  # the likelihood's element function, (x, t[, p]) -> (nll, d nll / dx)
    g_row,  # [D] pointer to this row of the saved gradient, scaled in place
    x_row,  # [D] pointer to this row of the likelihood's input (RECOMPUTE)
    t_row,  # [D] pointer to this row of its target (RECOMPUTE)
    s,  # scalar: the row's scale (fp32 or fp64)
    lo,  # first column of the chunk, a multiple of BLOCK
    hi,  # one past its last column, <= D
    D,  # row length
    B,  # batch size: the forward divided the gradient by it for MEAN
    MEAN: tl.constexpr,
    RECOMPUTE: tl.constexpr,  # a float16 gradient: recompute the elements out of its normal range
    BLOCK: tl.constexpr,
    p_row=None,  # [D] or [] pointer to ELEM's per-column parameter (RECOMPUTE, P_STRIDE not None)
    P_STRIDE: tl.constexpr = None,  # its column stride: 1, or 0 for one value; None: ELEM(x, t)
):
    # Exactly 1 (the plain loss.backward()) moves no bytes; NaN != 1, so NaN scales.
    if s != 1.0:
        cols0 = tl.arange(0, BLOCK)
        for start in range(lo, hi, BLOCK):
            cols = start + cols0
            mask = cols < D
            g = tl.load(g_row + cols, mask=mask, other=0.0)
            out = g * s
            if RECOMPUTE:
                # A float16 element outside float16's normal range: its forward value (for an
                # upstream of 1, with 1/B for mean) overflowed to inf beyond 65504, where this
                # row's scale may bring it back, or is a subnormal (or 0) below 2**-14 that
                # lost bits a GradScaler's scale would have kept. Recomputed in float32 from
                # input and target and rounded once; the masked loads touch only those.
                mag = tl.abs(g.to(tl.float32))
                over = mask & ((mag > 65504.0) | (mag < 6.103515625e-05))
                x = tl.load(x_row + cols, mask=over, other=0.5).to(tl.float32)
                t = tl.load(t_row + cols, mask=over, other=0).to(tl.float32)
                if P_STRIDE is None:
                    _, d = ELEM(x, t)
                elif P_STRIDE == 0:  # one scalar load: a masked load per lane spilled 16 B on sm_80
                    _, d = ELEM(x, t, tl.load(p_row).to(tl.float32))
                else:
                    _, d = ELEM(x, t, tl.load(p_row + cols, mask=over, other=0).to(tl.float32))
                if MEAN:
                    d = d * (tl.full([], 1.0, tl.float32) / B)
                out = tl.where(over, d * s, out)
            tl.store(g_row + cols, out.to(g_row.dtype.element_ty), mask=mask)


# ---- element math: the KL to N(0, I) -----------------------------------------------------


@triton.jit
def _kl_var_elem(lv):
    """expm1(min(lv, LOGVAR_MAX)) - lv: twice the KL of one latent, less mu^2. Finite in
    float32 for every finite lv (at most 1.2e26, or -lv).

    expm1, not exp(lv) - 1: near lv = 0, exp(lv) - 1 rounded on its own carries an absolute
    error of an ulp of 1 into a term of size lv^2 / 2."""
    return _expm1(tl.minimum(lv, _LOGVAR_MAX, propagate_nan=tl.PropagateNan.ALL)) - lv


@triton.jit
def _gaussian_kl_elem(mu, lv):
    """mu^2 + exp(min(lv, LOGVAR_MAX)) - 1 - lv (twice the KL of one latent)."""
    return mu * mu + _kl_var_elem(lv)


@triton.jit
def _kl_grad_lv(s, lv):
    """s * 0.5 * expm1(min(lv, LOGVAR_MAX)): the straight-through clamp's gradient."""
    return s * (0.5 * _expm1(tl.minimum(lv, _LOGVAR_MAX, propagate_nan=tl.PropagateNan.ALL)))


@triton.jit
def _prior_standardized(mu, lv, pm_ptrs, plv_ptrs, mask, HAS_PM: tl.constexpr, HAS_PLV: tl.constexpr):
    """(m, l): latents whose KL to N(0, I) is that of (mu, lv) to the prior N(pm,
    exp(plv)), ``m = (mu - pm) * exp(-plv / 2)`` and ``l = lv - plv``, in mu's dtype (the
    math dtype): the affine map that takes the prior to N(0, I) leaves the KL unchanged.
    ``pm_ptrs``/``plv_ptrs`` address the prior's elements of the block at its broadcast
    strides; an absent prior (HAS_* False) is not read."""
    if HAS_PM:
        mu = mu - tl.load(pm_ptrs, mask=mask, other=0.0).to(mu.dtype)
    if HAS_PLV:
        plv = tl.load(plv_ptrs, mask=mask, other=0.0).to(lv.dtype)
        mu = mu * tl.exp(-0.5 * plv)
        lv = lv - plv
    return mu, lv


@triton.jit
def _prior_kl_grads(
    s, mu, lv, pm_ptrs, plv_ptrs, gpm_ptrs, gplv_ptrs, mask, HAS_PM: tl.constexpr, HAS_PLV: tl.constexpr
):
    """(d/dmu, d/dlv) of ``s`` times the KL of (mu, lv) to the prior, mu and lv in s's dtype
    (the math dtype), standardized as ``_prior_standardized`` does; stores the priors'
    per-element gradients, ``d/dpm = -d/dmu`` and ``d/dplv = -g_l - 0.5 * g_m * m``, at the
    contiguous ``gpm_ptrs``/``gplv_ptrs`` in the priors' dtype.

    The variance's part first: its expm1 divides, which in float64 is a subroutine call on
    sm_80, and with the prior's mean still unread across it the float64 vae_loss backward
    does not spill there (it spilled 16 bytes the other way round; tests/test_triton_aot.py)."""
    if HAS_PLV:
        plv = tl.load(plv_ptrs, mask=mask, other=0.0).to(lv.dtype)
        lv = lv - plv
    g_l = _kl_grad_lv(s, lv)
    if HAS_PM:
        mu = mu - tl.load(pm_ptrs, mask=mask, other=0.0).to(mu.dtype)
    g_mu = s * mu
    if HAS_PLV:
        e = tl.exp(-0.5 * plv)
        m = mu * e
        g_m = s * m
        g_mu = g_m * e
        tl.store(gplv_ptrs, (-g_l - 0.5 * g_m * m).to(gplv_ptrs.dtype.element_ty), mask=mask)
    if HAS_PM:
        tl.store(gpm_ptrs, (-g_mu).to(gpm_ptrs.dtype.element_ty), mask=mask)
    return g_mu, g_l


# ---- reduction of per-row partials ------------------------------------------------------------


@triton.jit
def _finalize_kernel(
    part_ptr,  # [B, C] acc: partial sums of the first term (NLL), row b, column chunk c
    kl_ptr,  # [B] float64: per-row KL (HAS_KL only; vae_loss.py says why float64); [Z] column sums for FREE_BITS
    beta_ptr,  # [] acc: KL weight (HAS_KL only)
    loss_ptr,  # [B] (REDUCTION 0) or [] acc: first term + beta * KL, or the first term alone
    rec_ptr,  # [B] or [] acc: the first term (HAS_KL only)
    kl_out_ptr,  # [B] or [] acc: the KL term (HAS_KL only)
    B,  # rows
    C,  # column chunks per row
    fb_ptr,  # [] any float dtype, read as float64: the free bits lambda (FREE_BITS only)
    w_ptr,  # [Z] acc: out, 1 where latent element j's gradient passes, else 0 (FREE_BITS only)
    Z,  # latent elements per row (FREE_BITS only)
    HAS_KL: tl.constexpr,
    FREE_BITS: tl.constexpr,  # kl_ptr holds [Z] column sums of the KL (KL_COLUMNS), not [B] rows
    REDUCTION: tl.constexpr,  # 0 none (grid cdiv(B, BLOCK_B)), 1 mean or 2 sum (grid 1)
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_Z: tl.constexpr,  # latent elements per step of the free bits' loop
):
    ACC = part_ptr.dtype.element_ty
    KL_ACC = kl_ptr.dtype.element_ty
    offs_b = tl.arange(0, BLOCK_B)
    offs_c = tl.arange(0, BLOCK_C)
    if REDUCTION == 0:
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + offs_b
        rmask = rows < B
        acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs_c
            m = rmask[:, None] & (cols < C)[None, :]
            acc += tl.load(part_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0)
        rec = tl.sum(acc, axis=1)
        if HAS_KL:
            kl = tl.load(kl_ptr + rows, mask=rmask, other=0.0)
            beta = tl.load(beta_ptr)
            tl.store(rec_ptr + rows, rec, mask=rmask)
            tl.store(kl_out_ptr + rows, kl.to(ACC), mask=rmask)
            # Formed in the KL's float64, then rounded: beta = 0 times a KL beyond ACC's range is 0.
            tl.store(loss_ptr + rows, (rec + beta * kl).to(ACC), mask=rmask)
        else:
            tl.store(loss_ptr + rows, rec, mask=rmask)
    else:
        acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=ACC)
        acc_kl = tl.zeros([BLOCK_B], dtype=KL_ACC)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + offs_b.to(tl.int64)
            rmask = rows < B
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + offs_c
                m = rmask[:, None] & (cols < C)[None, :]
                acc += tl.load(part_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0)
            if HAS_KL and not FREE_BITS:
                acc_kl += tl.load(kl_ptr + rows, mask=rmask, other=0.0)
        rec = tl.sum(tl.sum(acc, axis=1), axis=0)
        if REDUCTION == 1:
            rec = rec / B
        if FREE_BITS:
            # sum_j where(S_j / B < lambda, lambda, S_j / B), in float64 and in column order;
            # B times it for sum (over no rows the means are 0/0: NaN, as the oracle's).
            lam = tl.full([BLOCK_Z], 0.0, tl.float64) + tl.load(fb_ptr).to(tl.float64)  # a block, for the |
            acc_fb = tl.zeros([BLOCK_Z], dtype=tl.float64)
            for z0 in range(0, Z, BLOCK_Z):
                cols = z0 + tl.arange(0, BLOCK_Z)
                zmask = cols < Z
                per = tl.load(kl_ptr + cols, mask=zmask, other=0.0).to(tl.float64) / B
                held = (per < lam) | (lam != lam)
                tl.store(w_ptr + cols, tl.where(held, 0.0, 1.0).to(w_ptr.dtype.element_ty), mask=zmask)
                acc_fb += tl.where(zmask, tl.where(held, lam, per), 0.0)
            kl = tl.sum(acc_fb, axis=0)
            if REDUCTION == 2:
                kl = kl * B
        else:
            kl = tl.sum(acc_kl, axis=0)
            if REDUCTION == 1:
                kl = kl / B
        if HAS_KL:
            beta = tl.load(beta_ptr)
            tl.store(rec_ptr, rec)
            tl.store(kl_out_ptr, kl.to(ACC))
            tl.store(loss_ptr, (rec + beta * kl).to(ACC))
        else:
            tl.store(loss_ptr, rec)


def finalize(part, kl, beta, loss, rec, kl_out, reduction: int, free_bits=None, weight=None) -> None:
    """Reduce the ``[B, C]`` partials (and the ``[B]`` KL rows) into the outputs; with
    ``free_bits`` (mean or sum), ``kl`` holds the KL's column sums and ``weight`` (their
    shape) takes the free bits' gradient mask."""
    B, C = part.shape
    has_kl = kl is not None
    if not has_kl:
        kl = beta = rec = kl_out = part  # never read: HAS_KL is a constexpr
    free = free_bits is not None
    if not free:
        free_bits = weight = part  # never read: FREE_BITS is a constexpr
    Z = weight.numel() if free else 0  # 0: one specialization for every finalize without free bits
    BLOCK_C = min(triton.next_power_of_2(max(C, 1)), 64)
    BLOCK_B = max(1, min(triton.next_power_of_2(max(B, 1)), 1024 // BLOCK_C))
    grid = (triton.cdiv(B, BLOCK_B),) if reduction == 0 else (1,)
    if grid[0] == 0:
        return
    _finalize_kernel[grid](
        part, kl, beta, loss, rec, kl_out, B, C, free_bits, weight, Z,
        HAS_KL=has_kl, FREE_BITS=free, REDUCTION=reduction, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C,
        BLOCK_Z=min(triton.next_power_of_2(max(Z, 1)), 1024), num_warps=4,
    )


# ---- launch helpers -----------------------------------------------------------------------------


def as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(x', D, row stride) where x' has x's data with unit stride within each row.

    No copy when the non-batch dims are contiguous among themselves, whatever the row
    stride (a padded row, ``h.chunk(2, dim=1)``, a target broadcast with ``expand``);
    otherwise (a transposed matrix, a channels-last image) a contiguous copy.
    """
    B = x.shape[0]
    D = x.numel() // B if B else 0
    expected = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:])):
        if size != 1 and stride != expected:
            x = x.contiguous()
            break
        expected *= size
    # For one row any stride is as good as another: keep D, which the JIT can
    # specialize on like the contiguous case.
    stride = x.stride(0) if B > 1 and x.dim() > 0 else D
    return x, D, stride


def prior_operand(prior: torch.Tensor | None, mu: torch.Tensor, name: str) -> tuple[torch.Tensor, int, int]:
    """``(prior', row stride, column stride)``: the prior as a [B, Z] view of mu's rows, read
    in place at its broadcast strides (stride 0 along a broadcast dim; a layout that no
    [B, Z] view can give, such as one per channel of an image-shaped latent, is copied,
    latent-sized); ``(mu, 0, 0)``, never read, where it is absent. It must broadcast to
    mu and have the latents' math dtype (the caller casts)."""
    if prior is None:
        return mu, 0, 0
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    if prior.dtype != acc:
        raise TypeError(f"vaekern (triton): {name} must be {acc} for {mu.dtype} latents here, got {prior.dtype}")
    if prior.device != mu.device:
        raise ValueError(f"vaekern (triton): {name} is on {prior.device}, mu on {mu.device}")
    try:
        rows = prior.expand(mu.shape).reshape(mu.shape[0], math.prod(mu.shape[1:]))
    except RuntimeError:
        raise ValueError(
            f"vaekern (triton): {name} of shape {tuple(prior.shape)} does not broadcast to mu's shape {tuple(mu.shape)}"
        ) from None
    return rows, rows.stride(0), rows.stride(1)


def as_loadable(t: torch.Tensor) -> torch.Tensor:
    """Targets are read in their own width; a bool is loaded as the uint8 it is stored as."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def row_config(B: int, D: int, itemsize: int) -> tuple[int, int, int, int]:
    """(BLOCK, num_warps, C, n_blocks) for a [B, D] image-sized kernel.

    Each program covers ``n_blocks`` column blocks of one row; the grid is (B, C).
    ``itemsize`` is the wider of the input's and the math's element sizes (8 whenever the
    kernel computes in float64, whatever the input: a float32 block size with float64
    math took 255 registers and spilled 248 bytes on sm_90).
    """
    if D >= MAX_ROW:
        raise ValueError(f"vaekern (triton): rows of {D} elements; at most {MAX_ROW - 1} are supported")
    if itemsize <= 4:
        BLOCK = max(128, min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_BYTES // 4))
        num_warps = max(1, min(8, BLOCK // 256))  # up to 16 values per thread
    else:
        # float64's exp and log are libdevice calls with twice the registers per value:
        # 4 values per thread (8 took 170-185 registers on sm_90).
        BLOCK = max(128, min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_BYTES // 16))
        num_warps = max(1, min(8, BLOCK // 128))
    total_blocks = max(1, triton.cdiv(D, BLOCK))
    want = max(1, min(triton.cdiv(TARGET_PROGRAMS, max(B, 1)), total_blocks))
    n_blocks = triton.cdiv(total_blocks, want)
    C = triton.cdiv(total_blocks, n_blocks)
    return BLOCK, num_warps, C, n_blocks


def latent_config(B: int, Z: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_Z, num_warps) for the [B, Z] latent tiles: rows per program x a
    column block that the program loops over (Z is small: tens to hundreds). ``itemsize``
    as for ``row_config``: 8 whenever the math is float64.

    8 values per thread at 4 warps, 2 for float64 (libdevice exp/log: 16 float64 values
    per thread took 255 registers and spilled on sm_80 and sm_90)."""
    tile = 1024 if itemsize <= 4 else 256
    BLOCK_Z = max(16, min(triton.next_power_of_2(max(Z, 1)), 256))
    BLOCK_B = max(1, min(triton.next_power_of_2(max(B, 1)), tile // BLOCK_Z))
    return BLOCK_B, BLOCK_Z, 4


def math_itemsize(x: torch.Tensor, acc: torch.dtype) -> int:
    """Element size that sizes a block: x's, or 8 where the math is float64 (``acc``)."""
    return max(x.element_size(), acc.itemsize)


def recompute_operands(grad: torch.Tensor, input: torch.Tensor, target: torch.Tensor):
    """``(x, t, stride_x, stride_t, RECOMPUTE)`` for ``_scale_row_chunk``: the likelihood's
    rows where ``grad`` is float16 (the only dtype whose values can overflow where its
    float32 math does not), else ``grad`` as a placeholder that is never read, so that a
    strided input is not copied for nothing."""
    if grad.dtype != torch.float16:
        return grad, grad, 0, 0, False
    if input.shape != grad.shape or input.dtype != grad.dtype or target.shape != grad.shape:
        raise ValueError(
            f"vaekern (triton): the saved gradient has shape {tuple(grad.shape)} and dtype {grad.dtype} but its "
            f"input has shape {tuple(input.shape)} and dtype {input.dtype}, its target shape {tuple(target.shape)}"
        )
    x, _, stride_x = as_rows(input)
    t, _, stride_t = as_rows(as_loadable(target))
    return x, t, stride_x, stride_t, True


def log_scale_operand(log_scale: torch.Tensor, input: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, int]:
    """``(log_scale, S_STRIDE)``: one value (0-d, or a [D] view of stride 0 such as an
    ``expand``-ed scalar) read at stride 0, else D values at stride 1; ``acc`` is the math
    dtype (the loss dtype), which log_scale must have."""
    D = math.prod(input.shape[1:])  # also for B = 0
    if log_scale.dtype != acc:
        raise TypeError(f"vaekern (triton): log_scale must be {acc} here, got {log_scale.dtype}")
    if log_scale.device != input.device:
        raise ValueError(f"vaekern (triton): log_scale is on {log_scale.device}, input on {input.device}")
    if log_scale.dim() == 0:
        return log_scale, 0
    if log_scale.shape != (D,):
        raise ValueError(
            f"vaekern (triton): log_scale must be 0-d or have D = {D} elements (input.shape[1:] flattened), "
            f"got shape {tuple(log_scale.shape)}"
        )
    if D == 1 or log_scale.stride(0) == 0:
        return log_scale, 0
    return log_scale.contiguous(), 1


def scale_stride(g: torch.Tensor) -> int:
    """Stride between the per-row scales of a grad_out of shape () (0) or (B,)."""
    return g.stride(0) if g.dim() else 0


def device_guard(x: torch.Tensor):
    """Launch on x's device (Triton launches on the current device's current stream)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
