// gaussian_kl on CPU: KL(N(mu, exp(lv)) || N(pm, exp(plv))), summed over each row.
//
// Math (per element; without a prior pm = plv = 0): the KL of the standardized latents
// m = (mu - pm) * exp(-plv / 2), l = lv - plv to N(0, I) (kl_kernel.h),
//   kl      = 0.5 * (m^2 + exp(min(l, 60)) - 1 - l)
//   d/dmu   = m * exp(-plv / 2),   d/dlv = 0.5 * (exp(min(l, 60)) - 1)
//   d/dpm   = -d/dmu,   d/dplv = -d/dlv - 0.5 * m^2   (per element; the op layer sums
//             them over the prior's broadcast dims)
// The clamp (60 is kLogvarMax, conventions.h) keeps float32 from overflowing; it is
// straight-through, so the gradient keeps the clamped variance's sign
// (vaekern/reference.py). Backward recomputes from mu, logvar and the prior (latent-sized,
// cheap) and scales row b by s_b = grad_out (/ B for mean). Reduction 3 sums each latent
// element over the rows instead (free bits), and its backward scales element j of every row
// by grad_out[j]. The KL term itself (row sums, gradients) is shared with vae_loss: kl.h.
//
// dtypes: mu and logvar float32/float64/bfloat16/float16, same dtype; computed in float
// (double for double), the prior's parts in that dtype. Loss float32, float64 for float64
// inputs.
#include <torch/library.h>

#include "cpu/checks.h"
#include "cpu/kl.h"
#include "cpu/row_ops.h"
#include "conventions.h"

namespace vaekern::cpu {

namespace {

void check_kl_reduction(int64_t reduction) {
  if (reduction != kKlColumns) check_reduction(reduction);
}

at::Tensor gaussian_kl_cpu(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
                           const std::optional<at::Tensor>& prior_logvar, int64_t reduction) {
  check_latents(mu, logvar);
  check_kl_reduction(reduction);
  const c10::ScalarType acc = acc_dtype({&mu, &logvar});
  const KlPrior prior = kl_prior(prior_mu, prior_logvar, mu);
  if (reduction == kKlColumns) {
    const std::vector<double> sums = gaussian_kl_columns(mu, logvar, prior);
    return reduce_rows(sums, 0, acc).view(mu.sizes().slice(1));  // one value per column
  }
  return reduce_rows(gaussian_kl_rows(mu, logvar, prior, acc, false), reduction, acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar, int64_t reduction) {
  check_latents(mu, logvar);
  check_kl_reduction(reduction);
  const int64_t rows = mu.size(0);
  const KlPrior prior = kl_prior(prior_mu, prior_logvar, mu);
  if (reduction == kKlColumns) {  // one upstream per latent element
    TORCH_CHECK(grad_out.sizes() == mu.sizes().slice(1), "vaekern (cpu): grad_out must have shape ",
                mu.sizes().slice(1), " (mu.shape[1:]) for the column reduction, got ", grad_out.sizes());
    return gaussian_kl_grads(row_values(grad_out.reshape({-1}), grad_out.numel(), "grad_out"), /*per_column=*/true,
                             mu, logvar, prior);
  }
  std::vector<double> scale = row_values(grad_out, rows, "grad_out");
  if (reduction == 1) {
    for (double& s : scale) s /= static_cast<double>(rows);
  }
  return gaussian_kl_grads(scale, /*per_column=*/false, mu, logvar, prior);
}

}  // namespace

TORCH_LIBRARY_IMPL(vaekern, CPU, m) {
  m.impl("gaussian_kl", &gaussian_kl_cpu);
  m.impl("gaussian_kl_backward", &gaussian_kl_backward_cpu);
}

}  // namespace vaekern::cpu
