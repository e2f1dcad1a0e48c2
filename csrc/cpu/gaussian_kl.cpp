// gaussian_kl on CPU: KL(N(mu, exp(lv)) || N(0, I)), summed over each row.
//
// Math (per element):
//   kl      = 0.5 * (mu^2 + exp(min(lv, 60)) - 1 - lv)
//   d/dmu   = mu,   d/dlv = 0.5 * (exp(min(lv, 60)) - 1)
// The clamp keeps float32 from overflowing; it is straight-through, so the gradient keeps
// the clamped variance's sign (vaekern/reference.py). Backward recomputes from mu and
// logvar (latent-sized, cheap) and scales row b by s_b = grad_out (/ B for mean).
//
// dtypes: mu and logvar float32/float64/bfloat16/float16, same dtype; computed in float
// (double for double). Loss float32, float64 for float64 inputs.
#include <torch/library.h>

#include "cpu/ops.h"

namespace vaekern::cpu {

std::vector<double> gaussian_kl_rows(const at::Tensor& mu_, const at::Tensor& logvar_) {
  const at::Tensor mu = mu_.contiguous(), logvar = logvar_.contiguous();
  const int64_t rows = mu.size(0), cols = row_len(mu);
  std::vector<double> out(rows);
  GaussianKlArgs args{};
  args.mu = mu.const_data_ptr();
  args.logvar = logvar.const_data_ptr();
  args.dtype = mu.scalar_type();
  args.rows = rows;
  args.cols = cols;
  args.out = out.data();
  const Kernels& k = kernels();
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) { k.gaussian_kl(args, begin, end); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gaussian_kl_grads(const std::vector<double>& scale, const at::Tensor& mu_,
                                                     const at::Tensor& logvar_) {
  const at::Tensor mu = mu_.contiguous(), logvar = logvar_.contiguous();
  const int64_t rows = mu.size(0), cols = row_len(mu);
  at::Tensor grad_mu = at::empty(mu.sizes(), mu.options());
  at::Tensor grad_logvar = at::empty(logvar.sizes(), logvar.options());
  GaussianKlArgs args{};
  args.mu = mu.const_data_ptr();
  args.logvar = logvar.const_data_ptr();
  args.dtype = mu.scalar_type();
  args.rows = rows;
  args.cols = cols;
  args.scale = scale.data();
  args.grad_mu = grad_mu.mutable_data_ptr();
  args.grad_logvar = grad_logvar.mutable_data_ptr();
  const Kernels& k = kernels();
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) { k.gaussian_kl_backward(args, begin, end); });
  return {grad_mu, grad_logvar};
}

namespace {

at::Tensor gaussian_kl_cpu(const at::Tensor& mu, const at::Tensor& logvar, int64_t reduction) {
  check_latents(mu, logvar);
  check_reduction(reduction);
  return reduce_rows(gaussian_kl_rows(mu, logvar), reduction, acc_dtype({&mu, &logvar}));
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
