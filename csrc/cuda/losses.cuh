// The per-element math of the two loss terms and the stage-1 tile loops that both the
// single-term ops (bernoulli_nll.cu, gaussian_kl.cu) and the fused vae_loss.cu run.
//
// Bernoulli NLL, logits l, target t (softplus form: exp never sees a positive argument):
//   nll = max(l, 0) - l*t + log1p(exp(-|l|))          d nll / dl = sigmoid(l) - t
// Bernoulli NLL, probabilities p (logs clamped at -100 as F.binary_cross_entropy):
//   nll = -(t*max(log p, -100) + (1-t)*max(log1p(-p), -100))
//   d nll / dp = (p - t) / max(p*(1-p), 1e-12)
// Gaussian KL to N(0, I), with the straight-through clamp of vaekern.reference:
//   kl = 0.5*(mu^2 + exp(min(lv, 60)) - 1 - lv)        (exp(.) - 1 evaluated as expm1)
//   d kl / dmu = mu,  d kl / dlv = 0.5*(exp(min(lv, 60)) - 1)
// 60, -100 and 1e-12 are kLogvarMax, kBceLogMin and kBceGradEps (loss_limits.h).
#pragma once

#include "common.cuh"
#include "loss_limits.h"

namespace vaekern {
namespace cuda {

// The loss of one element; *grad gets its derivative (for an upstream gradient of 1).
//
// Logits: sigmoid(x) - t = num / (1 + e) with e = exp(-|x|), num = (1 - t) - t*e for x >= 0
// and (e - t) - t*e below. Where sigmoid(x) and t nearly cancel, 1 - t or e - t is exact
// (Sterbenz) and the fma rounds once, so only the rounding of e itself is left: an absolute
// error of about t*e*6e-8 in float, the size of PyTorch's own float32 gradient error.
// NaN x takes the second branch and gives NaN.
template <bool kLogits, typename acc_t>
__device__ __forceinline__ acc_t bce(acc_t x, acc_t t, acc_t* grad) {
  if constexpr (kLogits) {
    const acc_t e = dexp(-dabs(x));  // in (0, 1]: no overflow for any logit
    *grad = dfma(-t, e, x >= acc_t(0) ? acc_t(1) - t : e - t) / (acc_t(1) + e);
    return dfma(-x, t, x > acc_t(0) ? x : acc_t(0)) + dlog1p(e);
  } else {
    const acc_t lp = clamp_min(dlog(x), acc_t(kBceLogMin));
    const acc_t lq = clamp_min(dlog1p(-x), acc_t(kBceLogMin));
    *grad = (x - t) / clamp_min(x * (acc_t(1) - x), acc_t(kBceGradEps));
    return -(t * lp + (acc_t(1) - t) * lq);
  }
}

// exp(lv) - 1 is formed with expm1: near lv = 0, exp rounded first would carry an absolute
// error of an ulp of 1 into terms of size lv^2 / 2 (and lv / 2 for the gradient).
template <typename acc_t>
__device__ __forceinline__ acc_t kl_elem(acc_t mu, acc_t lv) {
  return acc_t(0.5) * (mu * mu + (dexpm1(clamp_max(lv, acc_t(kLogvarMax))) - lv));
}

template <typename acc_t>
__device__ __forceinline__ acc_t kl_grad_lv(acc_t lv) {
  return acc_t(0.5) * dexpm1(clamp_max(lv, acc_t(kLogvarMax)));
}

// Stage-1 arguments of the reconstruction term.
template <typename scalar_t, typename acc_t>
struct ReconArgs {
  const scalar_t* x;  // [B, D] logits or probabilities, rows x_stride apart
  const void* t;      // [B, D] targets of kind t_kind, rows t_stride apart
  scalar_t* grad;     // [B, D] contiguous d loss / dx, or nullptr
  int64_t x_stride, t_stride, D, tile_len;
  int t_kind;
  acc_t grad_scale;   // 1, or 1/B for reduction="mean"
};

// Elements per vector load of the reconstruction: 16 bytes of input, or 2 elements when
// the math is in double (float input with float64 latents in vae_loss): 4 elements of
// double logs at once spill on sm_80.
template <typename scalar_t, typename acc_t>
constexpr int recon_vec() {
  return sizeof(acc_t) == 8 ? 2 : 16 / static_cast<int>(sizeof(scalar_t));
}

// The lane's share of tile [start, end) of row b: its sum of nll, and the gradient written.
template <bool kLogits, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t recon_tile(const ReconArgs<scalar_t, acc_t>& a, int64_t b, int64_t start, int sub,
                                            int G) {
  constexpr int VEC = recon_vec<scalar_t, acc_t>();
  constexpr unsigned kBytes = VEC * sizeof(scalar_t);
  const scalar_t* x = a.x + b * a.x_stride;
  const int tsize = kind_size(a.t_kind);
  const void* t = static_cast<const char*>(a.t) + b * a.t_stride * tsize;
  scalar_t* g = a.grad == nullptr ? nullptr : a.grad + b * a.D;
  const int64_t end = min(start + a.tile_len, a.D);
  acc_t sum = 0;
  int64_t e0 = start;
  const unsigned t_align = VEC * tsize < 16 ? VEC * tsize : 16;
  // The path (and so the order of the sum) depends on the inputs' alignment only: a
  // misaligned gradient row (a row-strided input with an odd row length, say) is stored
  // element by element, so the loss is bitwise the same with and without compute_grad.
  if (is_aligned(x, kBytes) && is_aligned(t, t_align)) {
    const bool g_vec = g != nullptr && is_aligned(g, kBytes);
    const int64_t vend = start + (end - start) / VEC * VEC;
#pragma unroll 1  // ~40 KB in flight per SM at this occupancy covers HBM latency
    for (int64_t e = start + sub * VEC; e < vend; e += G * VEC) {
      const Vec<scalar_t, VEC> xv = load_vec<scalar_t, VEC>(x + e);
      acc_t tv[VEC];
      load_kind_vec<VEC>(t, e, a.t_kind, tv);
      Vec<scalar_t, VEC> gv;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc_t gi;
        sum += bce<kLogits>(to_acc<scalar_t, acc_t>(xv.v[i]), tv[i], &gi);
        gv.v[i] = static_cast<scalar_t>(gi * a.grad_scale);
      }
      if (g_vec) {
        store_vec(g + e, gv);
      } else if (g != nullptr) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) g[e + i] = gv.v[i];
      }
    }
    e0 = vend;
  }
  for (int64_t e = e0 + sub; e < end; e += G) {
    acc_t gi;
    sum += bce<kLogits>(to_acc<scalar_t, acc_t>(x[e]), load_kind<acc_t>(t, e, a.t_kind), &gi);
    if (g != nullptr) g[e] = static_cast<scalar_t>(gi * a.grad_scale);
  }
  return sum;
}

// The lane's share of the KL of latents [start, end) of row b.
template <typename lat_t, typename acc_t>
__device__ __forceinline__ acc_t kl_tile(const lat_t* mu, const lat_t* lv, int64_t start, int64_t end, int sub, int G) {
  acc_t sum = 0;
  for (int64_t e = start + sub; e < end; e += G) sum += kl_elem(to_acc<lat_t, acc_t>(mu[e]), to_acc<lat_t, acc_t>(lv[e]));
  return sum;
}

// Tile of a row of latents for G lanes: short, since latents are few.
inline int64_t kl_tile_len(int G) { return static_cast<int64_t>(G) * 32; }

// grad_mu = s_b * mu, grad_logvar = s_b * 0.5 * (exp(min(lv, 60)) - 1), contiguous, in mu's
// dtype (gaussian_kl.cu; also run by vae_loss_backward_).
std::tuple<Tensor, Tensor> gaussian_kl_grads_cuda(const Tensor& mu, const Tensor& logvar, const RowScale& scale,
                                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace vaekern
