// The KL term of kl.h: one task per row of latents (latent rows are short).
#include "cpu/kl.h"

#include <ATen/ops/empty.h>

#include "cpu/row_ops.h"

namespace vaekern::cpu {
namespace {

// The arguments both directions share: mu and logvar (contiguous, kept alive by the caller).
GaussianKlArgs latent_args(const at::Tensor& mu, const at::Tensor& logvar) {
  GaussianKlArgs args{};
  args.mu = mu.const_data_ptr();
  args.logvar = logvar.const_data_ptr();
  args.dtype = mu.scalar_type();
  args.rows = mu.size(0);
  args.cols = row_len(mu);
  return args;
}

}  // namespace

std::vector<double> gaussian_kl_rows(const at::Tensor& mu_, const at::Tensor& logvar_, c10::ScalarType acc,
                                     bool wide_sums) {
  const at::Tensor mu = mu_.contiguous(), logvar = logvar_.contiguous();
  const int64_t rows = mu.size(0), cols = row_len(mu);
  std::vector<double> out(rows);
  GaussianKlArgs args = latent_args(mu, logvar);
  args.acc_dtype = acc;
  args.wide_sums = wide_sums;
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
  GaussianKlArgs args = latent_args(mu, logvar);
  args.scale = scale.data();
  args.grad_mu = grad_mu.mutable_data_ptr();
  args.grad_logvar = grad_logvar.mutable_data_ptr();
  const Kernels& k = kernels();
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) { k.gaussian_kl_backward(args, begin, end); });
  return {grad_mu, grad_logvar};
}

}  // namespace vaekern::cpu
