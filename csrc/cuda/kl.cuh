// The Gaussian KL term of the losses, shared by gaussian_kl.cu and the fused vae_loss.cu:
// its element math, its stage-1 tile loop, and its latent gradients (kl.cu).
//
// KL to the prior N(pm, exp(plv)) (0 where a part is absent), taken to N(0, I) on load
// (PriorRow::standardize): with m = (mu - pm) * e, l = lv - plv, e = exp(-plv / 2), and the
// straight-through clamp of vaekern.reference (60 is kLogvarMax, conventions.h):
//   kl = 0.5*(m^2 + exp(min(l, 60)) - 1 - l)        (exp(.) - 1 evaluated as expm1)
//   d kl / dm = m,  d kl / dl = 0.5*(exp(min(l, 60)) - 1)
//   d/dmu = e * d kl / dm, d/dlv = d kl / dl, d/dpm = -d/dmu, d/dplv = -d kl / dl - 0.5 * m * d kl / dm
#pragma once

#include <optional>

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

// The KL term's prior as the kernels read it: each part a [B, D] view of it broadcast to the
// latents, at its strides (0 along a broadcast dim), in the latents' arithmetic type
// (acc_type of theirs: float, double for double latents); nullptr where a part is absent.
struct KlPrior {
  const void* mu = nullptr;
  const void* lv = nullptr;
  int64_t mu_row = 0, mu_col = 0, lv_row = 0, lv_col = 0;
};

// The tensors behind a KlPrior, which the caller keeps alive over the launch.
struct KlPriorViews {
  Tensor mu, lv;  // undefined where absent
  KlPrior operand() const {
    KlPrior p;
    if (mu.defined()) p = KlPrior{mu.data_ptr(), nullptr, mu.stride(0), mu.stride(1), 0, 0};
    if (lv.defined()) {
      p.lv = lv.data_ptr();
      p.lv_row = lv.stride(0);
      p.lv_col = lv.stride(1);
    }
    return p;
  }
};

// The prior's views, checked: each part broadcasts to mu and has the latents' arithmetic
// dtype (float32; float64 for float64 latents), which the op layer casts it to (kl.cu).
KlPriorViews kl_prior(const std::optional<Tensor>& prior_mu, const std::optional<Tensor>& prior_logvar,
                      const Tensor& mu);

// Row b of a KlPrior, as P (the prior's type): its parts' row pointers (nullptr where
// absent) and column strides, formed once per tile instead of once per latent (per latent,
// the float16/bfloat16 gaussian_kl forward spilled 16 bytes on sm_90; test_cuda_kernels.py).
template <typename P>
struct PriorRow {
  const P* mu;
  const P* lv;
  int64_t mu_col, lv_col;

  __device__ __forceinline__ PriorRow(const KlPrior& p, int64_t b)
      : mu(p.mu != nullptr ? static_cast<const P*>(p.mu) + b * p.mu_row : nullptr),
        lv(p.lv != nullptr ? static_cast<const P*>(p.lv) + b * p.lv_row : nullptr),
        mu_col(p.mu_col),
        lv_col(p.lv_col) {}

  // (m, l, e) of the header for latent k of the row, from mu and lv in place; e = 1 without
  // a prior log-variance.
  template <typename acc_t>
  __device__ __forceinline__ void standardize(int64_t k, acc_t& m, acc_t& l, acc_t& e) const {
    if (mu != nullptr) m -= static_cast<acc_t>(mu[k * mu_col]);
    if (lv != nullptr) {
      const acc_t q = static_cast<acc_t>(lv[k * lv_col]);
      e = dexp(acc_t(-0.5) * q);
      m *= e;
      l -= q;
    }
  }
};

// The lane's share of the KL of latents [start, end) of row b (row pointers mu, lv).
template <typename lat_t, typename acc_t>
__device__ __forceinline__ acc_t kl_tile(const lat_t* mu, const lat_t* lv, const KlPrior& prior, int64_t b,
                                         int64_t start, int64_t end, int sub, int G) {
  const PriorRow<acc_type<lat_t>> p(prior, b);
  acc_t sum = 0;
  for (int64_t k = start + sub; k < end; k += G) {
    acc_t m = to_acc<lat_t, acc_t>(mu[k]), l = to_acc<lat_t, acc_t>(lv[k]), e = 1;
    p.standardize(k, m, l, e);
    sum += kl_elem(m, l);
  }
  return sum;
}

// As kl_tile, with m^2 and the sum in double whatever acc_t: vae_loss's KL (vae_loss.cu
// says why). Only these can leave float's range; kl_var_elem stays in acc_t.
template <typename lat_t, typename acc_t>
__device__ __forceinline__ double kl_tile_wide(const lat_t* mu, const lat_t* lv, const KlPrior& prior, int64_t b,
                                               int64_t start, int64_t end, int sub, int G) {
  const PriorRow<acc_type<lat_t>> p(prior, b);
  double sum = 0;
  for (int64_t k = start + sub; k < end; k += G) {
    acc_t m = to_acc<lat_t, acc_t>(mu[k]), l = to_acc<lat_t, acc_t>(lv[k]), e = 1;
    p.standardize(k, m, l, e);
    const double md = m;
    sum += 0.5 * (md * md + static_cast<double>(kl_var_elem(l)));
  }
  return sum;
}

// Each latent column's KL summed over the rows (the KL_COLUMNS reduction) into `sums` ([D]:
// the latents' arithmetic type, or double), summed in that type: gaussian_kl's reduction 3
// and vae_loss's free bits. m and l are the latents as rows of dtype `dtype`.
void gaussian_kl_columns(const Rows& m, const Rows& l, at::ScalarType dtype, const KlPrior& prior, const Tensor& sums,
                         cudaStream_t stream);

// Tile of a row of latents for G lanes: short, since latents are few.
inline int64_t kl_tile_len(int G) { return static_cast<int64_t>(G) * 32; }

// (grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar) for the row scales s_b (per column,
// s_j, where per_column: the column reduction's upstream) (the
// header's derivatives times s_b), contiguous, in mu's dtype and the prior's (per element,
// mu's shape; (0,) where a part is absent): the backward of gaussian_kl, and the latent
// half of vae_loss_backward_'s.
std::tuple<Tensor, Tensor, Tensor, Tensor> gaussian_kl_grads(const Tensor& mu, const Tensor& logvar,
                                                             const KlPriorViews& prior, const RowScale& scale,
                                                             bool per_column, cudaStream_t stream);

}  // namespace cuda
}  // namespace vaekern
