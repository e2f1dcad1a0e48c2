// Per-row scales of the backward kernels (RowScale). Shared by every backward:
// bernoulli_nll_backward_ and vae_loss_backward_ scale the gradient that forward saved by
// one (scale_likelihood_rows_, likelihood.cuh), and gaussian_kl_backward and
// vae_loss_backward_ pass one to the KL's gradients (kl.cuh).
#pragma once

#include "common.cuh"

namespace vaekern {
namespace cuda {

// s_b = (grad_loss_b * beta + grad_term_b) / divisor, evaluated in double, or 0 where
// weight_b is 0. grad_loss is the upstream gradient of the loss and is required; beta (the
// loss's weight of the term), grad_term (the upstream gradient of the term as an output of
// its own) and weight (vae_loss's free-bits mask per latent column, indexed as b: 0 holds
// the column's gradient at 0 whatever s, as the oracle's where) are optional. Each gradient
// is () (stride 0) or (B,), float or double (scale_operand); beta is ().
struct RowScale {
  const void* grad_loss;
  const void* beta = nullptr;
  const void* grad_term = nullptr;
  int64_t grad_loss_stride = 0, grad_term_stride = 0;
  int grad_loss_kind = kF32, beta_kind = kF32, grad_term_kind = kF32;
  double divisor = 1.0;
  const void* weight = nullptr;
  int weight_kind = kF32;

  __device__ __forceinline__ double operator()(int64_t b) const {
    double s = load_kind<double>(grad_loss, b * grad_loss_stride, grad_loss_kind);
    if (beta != nullptr) s *= load_kind<double>(beta, 0, beta_kind);
    if (grad_term != nullptr) s += load_kind<double>(grad_term, b * grad_term_stride, grad_term_kind);
    if (divisor != 1.0) s /= divisor;
    return weight != nullptr && load_kind<double>(weight, b, weight_kind) == 0.0 ? 0.0 : s;
  }
};

// A () or (B,) gradient of a loss, as a RowScale operand (any float dtype, any stride).
inline Tensor scale_operand(const Tensor& g, const Tensor& like, int64_t B, const char* name, int64_t* stride) {
  check_cuda(g, name, like);
  check_float(g, name);
  TORCH_CHECK(g.dim() == 0 || (g.dim() == 1 && g.size(0) == B), "vaekern (cuda): ", name,
              " must have shape () or (", B, ",), got ", g.sizes());
  Tensor t = g;
  if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble) t = t.to(at::kFloat);
  *stride = t.dim() == 0 ? 0 : t.stride(0);
  return t;
}

}  // namespace cuda
}  // namespace vaekern
