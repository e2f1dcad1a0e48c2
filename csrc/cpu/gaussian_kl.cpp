// gaussian_kl on CPU: KL(N(mu, exp(lv)) || N(0, I)), summed over each row.
//
// Math (per element):
//   kl      = 0.5 * (mu^2 + exp(min(lv, 60)) - 1 - lv)
//   d/dmu   = mu,   d/dlv = 0.5 * (exp(min(lv, 60)) - 1)
// The clamp (60 is kLogvarMax, conventions.h) keeps float32 from overflowing; it is
// straight-through, so the gradient keeps the clamped variance's sign
// (vaekern/reference.py). Backward recomputes from mu and logvar (latent-sized, cheap) and
// scales row b by s_b = grad_out (/ B for mean). The KL term itself (row sums, gradients)
// is shared with vae_loss: kl.h.
//
// dtypes: mu and logvar float32/float64/bfloat16/float16, same dtype; computed in float
// (double for double). Loss float32, float64 for float64 inputs.
#include <torch/library.h>

#include "cpu/checks.h"
#include "cpu/kl.h"
#include "cpu/row_ops.h"

namespace vaekern::cpu {

namespace {

at::Tensor gaussian_kl_cpu(const at::Tensor& mu, const at::Tensor& logvar, int64_t reduction) {
  check_latents(mu, logvar);
  check_reduction(reduction);
  const c10::ScalarType acc = acc_dtype({&mu, &logvar});
  return reduce_rows(gaussian_kl_rows(mu, logvar, acc, false), reduction, acc);
}

std::tuple<at::Tensor, at::Tensor> gaussian_kl_backward_cpu(const at::Tensor& grad_out, const at::Tensor& mu,
                                                            const at::Tensor& logvar, int64_t reduction) {
  check_latents(mu, logvar);
  check_reduction(reduction);
  const int64_t rows = mu.size(0);
  std::vector<double> scale = row_values(grad_out, rows, "grad_out");
  if (reduction == 1) {
    for (double& s : scale) s /= static_cast<double>(rows);
  }
  return gaussian_kl_grads(scale, mu, logvar);
}

}  // namespace

TORCH_LIBRARY_IMPL(vaekern, CPU, m) {
  m.impl("gaussian_kl", &gaussian_kl_cpu);
  m.impl("gaussian_kl_backward", &gaussian_kl_backward_cpu);
}

}  // namespace vaekern::cpu
