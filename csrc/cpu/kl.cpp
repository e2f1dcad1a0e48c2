// The KL term of kl.h: one task per row of latents (latent rows are short), or per group of
// columns for the column reduction.
#include "cpu/kl.h"

#include <ATen/ExpandUtils.h>
#include <ATen/ops/empty.h>
#include <c10/util/accumulate.h>

#include "cpu/row_ops.h"

namespace vaekern::cpu {
namespace {

// The arguments both directions share: mu and logvar (contiguous, kept alive by the
// caller) and the prior's views.
GaussianKlArgs latent_args(const at::Tensor& mu, const at::Tensor& logvar, const KlPrior& prior) {
  const auto operand = [](const at::Tensor& v) {
    return v.defined() ? PriorOperand{v.const_data_ptr(), v.stride(0), v.stride(1)} : PriorOperand{nullptr, 0, 0};
  };
  GaussianKlArgs args{};
  args.mu = mu.const_data_ptr();
  args.logvar = logvar.const_data_ptr();
  args.dtype = mu.scalar_type();
  args.rows = mu.size(0);
  args.cols = row_len(mu);
  args.prior_mu = operand(prior.mu);
  args.prior_logvar = operand(prior.logvar);
  return args;
}

at::Tensor prior_view(const std::optional<at::Tensor>& part, const at::Tensor& mu, const char* name) {
  if (!part.has_value()) return {};
  const at::Tensor& p = *part;
  TORCH_CHECK(p.device().is_cpu(), "vaekern (cpu): ", name, " must be a CPU tensor, got ", p.device());
  const c10::ScalarType acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(p.scalar_type() == acc, "vaekern (cpu): ", name, " must be ", acc, " (the math dtype of ",
              mu.scalar_type(), " latents), got ", p.scalar_type());
  TORCH_CHECK(at::is_expandable_to(p.sizes(), mu.sizes()), "vaekern (cpu): ", name, " of shape ", p.sizes(),
              " does not broadcast to mu's shape ", mu.sizes());
  // A view wherever the broadcast allows one (a prior per latent: row stride 0); a layout
  // no [rows, cols] view can give (one per channel of an image-shaped latent) is copied.
  return p.expand(mu.sizes()).reshape({mu.size(0), row_len(mu)});
}

at::Tensor prior_grad_output(const at::Tensor& part, const at::Tensor& mu) {
  return part.defined() ? at::empty(mu.sizes(), mu.options().dtype(part.scalar_type())) : mu.new_empty({0});
}

}  // namespace

KlPrior kl_prior(const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
                 const at::Tensor& mu) {
  return {prior_view(prior_mu, mu, "prior_mu"), prior_view(prior_logvar, mu, "prior_logvar")};
}

std::vector<double> gaussian_kl_rows(const at::Tensor& mu_, const at::Tensor& logvar_, const KlPrior& prior,
                                     c10::ScalarType acc, bool wide_sums) {
  const at::Tensor mu = mu_.contiguous(), logvar = logvar_.contiguous();
  const int64_t rows = mu.size(0), cols = row_len(mu);
  std::vector<double> out(rows);
  GaussianKlArgs args = latent_args(mu, logvar, prior);
  args.acc_dtype = acc;
  args.wide_sums = wide_sums;
  args.out = out.data();
  const Kernels& k = kernels();
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) { k.gaussian_kl(args, begin, end); });
  return out;
}

std::vector<double> gaussian_kl_columns(const at::Tensor& mu_, const at::Tensor& logvar_, const KlPrior& prior) {
  const at::Tensor mu = mu_.contiguous(), logvar = logvar_.contiguous();
  // The columns' count from the shape: with no rows there are still columns, each summing to 0.
  const int64_t rows = mu.size(0), cols = c10::multiply_integers(mu.sizes().slice(1));
  std::vector<double> out(cols);
  GaussianKlArgs args = latent_args(mu, logvar, prior);
  args.cols = cols;
  args.out = out.data();
  const Kernels& k = kernels();
  // At least 16 columns a task: a whole vector of floats at every capability (AVX-512's 16).
  at::parallel_for(0, cols, std::max<int64_t>(16, grain(rows)),
                   [&](int64_t begin, int64_t end) { k.gaussian_kl_columns(args, begin, end); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_grads(const std::vector<double>& scale,
                                                                             bool per_column,
                                                                             const at::Tensor& mu_,
                                                                             const at::Tensor& logvar_,
                                                                             const KlPrior& prior) {
  const at::Tensor mu = mu_.contiguous(), logvar = logvar_.contiguous();
  const int64_t rows = mu.size(0), cols = row_len(mu);
  at::Tensor grad_mu = at::empty(mu.sizes(), mu.options());
  at::Tensor grad_logvar = at::empty(logvar.sizes(), logvar.options());
  at::Tensor grad_prior_mu = prior_grad_output(prior.mu, mu);
  at::Tensor grad_prior_logvar = prior_grad_output(prior.logvar, mu);
  GaussianKlArgs args = latent_args(mu, logvar, prior);
  args.scale = scale.data();
  args.per_column = per_column;
  args.grad_mu = grad_mu.mutable_data_ptr();
  args.grad_logvar = grad_logvar.mutable_data_ptr();
  args.grad_prior_mu = prior.mu.defined() ? grad_prior_mu.mutable_data_ptr() : nullptr;
  args.grad_prior_logvar = prior.logvar.defined() ? grad_prior_logvar.mutable_data_ptr() : nullptr;
  const Kernels& k = kernels();
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) { k.gaussian_kl_backward(args, begin, end); });
  return {grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar};
}

}  // namespace vaekern::cpu
