// The Gaussian KL term of the losses, shared by gaussian_kl.cu and the fused vae_loss.cu:
// its element math, its stage-1 tile loop, and its latent gradients (kl.cu).
//
// KL to N(0, I), with the straight-through clamp of vaekern.reference (60 is kLogvarMax,
// conventions.h):
//   kl = 0.5*(mu^2 + exp(min(lv, 60)) - 1 - lv)        (exp(.) - 1 evaluated as expm1)
//   d kl / dmu = mu,  d kl / dlv = 0.5*(exp(min(lv, 60)) - 1)
#pragma once

#include "common.cuh"
#include "conventions.h"
#include "row_scale.cuh"

namespace vaekern {
namespace cuda {

// Twice the KL less mu^2: finite in float for every finite lv (at most 1.2e26, or -lv).
// exp(lv) - 1 is formed with expm1: near lv = 0, exp rounded first would carry an absolute
// error of an ulp of 1 into terms of size lv^2 / 2 (and lv / 2 for the gradient).
template <typename acc_t>
__device__ __forceinline__ acc_t kl_var_elem(acc_t lv) {
  return dexpm1(clamp_max(lv, acc_t(kLogvarMax))) - lv;
}

template <typename acc_t>
__device__ __forceinline__ acc_t kl_elem(acc_t mu, acc_t lv) {
  return acc_t(0.5) * (mu * mu + kl_var_elem(lv));
}

template <typename acc_t>
__device__ __forceinline__ acc_t kl_grad_lv(acc_t lv) {
  return acc_t(0.5) * dexpm1(clamp_max(lv, acc_t(kLogvarMax)));
}

// The lane's share of the KL of latents [start, end) of row b.
template <typename lat_t, typename acc_t>
__device__ __forceinline__ acc_t kl_tile(const lat_t* mu, const lat_t* lv, int64_t start, int64_t end, int sub, int G) {
  acc_t sum = 0;
  for (int64_t e = start + sub; e < end; e += G) sum += kl_elem(to_acc<lat_t, acc_t>(mu[e]), to_acc<lat_t, acc_t>(lv[e]));
  return sum;
}

// As kl_tile, with mu^2 and the sum in double whatever acc_t: vae_loss's KL (vae_loss.cu
// says why). Only these can leave float's range; kl_var_elem stays in acc_t.
template <typename lat_t, typename acc_t>
__device__ __forceinline__ double kl_tile_wide(const lat_t* mu, const lat_t* lv, int64_t start, int64_t end, int sub,
                                               int G) {
  double sum = 0;
  for (int64_t e = start + sub; e < end; e += G) {
    const double m = to_acc<lat_t, acc_t>(mu[e]);
    sum += 0.5 * (m * m + static_cast<double>(kl_var_elem(to_acc<lat_t, acc_t>(lv[e]))));
  }
  return sum;
}

// Tile of a row of latents for G lanes: short, since latents are few.
inline int64_t kl_tile_len(int G) { return static_cast<int64_t>(G) * 32; }

// grad_mu = s_b * mu, grad_logvar = s_b * 0.5 * (exp(min(lv, 60)) - 1), contiguous, in mu's
// dtype: the backward of gaussian_kl, and the latent half of vae_loss_backward_'s.
std::tuple<Tensor, Tensor> gaussian_kl_grads(const Tensor& mu, const Tensor& logvar, const RowScale& scale,
                                             cudaStream_t stream);

}  // namespace cuda
}  // namespace vaekern
