// The Gaussian KL term on CPU, shared by the ops that have one (gaussian_kl.cpp,
// vae_loss.cpp): per-row (or per-column) sums of the KL to a diagonal Gaussian prior, and
// the latents' and the prior's gradients for per-row (or per-column) scales.
// Math and vectorized loops: kl_kernel.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace vaekern::cpu {

// The KL term's prior as the kernels read it: [rows, cols] views of prior_mu and
// prior_logvar broadcast to mu, at their strides (undefined where a part is absent).
struct KlPrior {
  at::Tensor mu, logvar;
};

// The prior's views, checked: each part broadcasts to mu and has the latents' arithmetic
// dtype (float32; float64 for float64 latents), which the op layer casts it to.
KlPrior kl_prior(const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
                 const at::Tensor& mu);

// Per-row KL sums to the prior, computed in acc (float, or double; never float for double
// latents); with wide_sums, m^2 and the sums in double whatever acc (vae_loss).
std::vector<double> gaussian_kl_rows(const at::Tensor& mu, const at::Tensor& logvar, const KlPrior& prior,
                                     c10::ScalarType acc, bool wide_sums);

// The KL of each latent column summed over the rows (the KL_COLUMNS reduction), in the
// latents' arithmetic type, each column's rows added in order.
std::vector<double> gaussian_kl_columns(const at::Tensor& mu, const at::Tensor& logvar, const KlPrior& prior);

// (s * d kl / d mu, s * d kl / d logvar, and the same per element for prior_mu and
// prior_logvar, or (0,) where a part is absent), contiguous, with s = scale[b] for row b,
// or scale[j] for column j where per_column (the KL_COLUMNS reduction's upstream).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_grads(const std::vector<double>& scale,
                                                                             bool per_column, const at::Tensor& mu,
                                                                             const at::Tensor& logvar,
                                                                             const KlPrior& prior);

}  // namespace vaekern::cpu
