// The Gaussian KL term on CPU, shared by the ops that have one (gaussian_kl.cpp,
// vae_loss.cpp): per-row sums of the KL, and the latent gradients for per-row scales.
// Math and vectorized loops: kl_kernel.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace vaekern::cpu {

// Per-row KL sums, computed in acc (float, or double; never float for double latents);
// with wide_sums, mu^2 and the sums in double whatever acc (vae_loss).
std::vector<double> gaussian_kl_rows(const at::Tensor& mu, const at::Tensor& logvar, c10::ScalarType acc,
                                     bool wide_sums);

// (scale[b] * d kl_b / d mu, scale[b] * d kl_b / d logvar), contiguous.
std::tuple<at::Tensor, at::Tensor> gaussian_kl_grads(const std::vector<double>& scale, const at::Tensor& mu,
                                                     const at::Tensor& logvar);

}  // namespace vaekern::cpu
