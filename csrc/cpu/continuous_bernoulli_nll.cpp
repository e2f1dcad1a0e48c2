// continuous_bernoulli_nll on CPU: the continuous Bernoulli negative log-likelihood
// (Loaiza-Ganem & Cunningham 2019) and, in the same pass, its gradient.
//
// Math (eta logits, lam probabilities, t targets in [0, 1]; per element, summed over each
// row), with the log normalizer L(eta) = -log(eta / tanh(eta/2)) = -log C(lam):
//   logits: nll = max(eta, 0) - eta*t + log1p(exp(-|eta|)) + L(eta)
//           d nll/deta = sigmoid(eta) - t + L'(eta),   L'(eta) = 1/sinh(eta) - 1/eta
//   probs:  lp = max(log lam, -100), lq = max(log1p(-lam), -100), eta = lp - lq,
//           nll = -(t*lp + (1-t)*lq) + L(eta),
//           d nll/dlam = (lam - t + L'(eta)) / max(lam*(1-lam), 1e-12)
// i.e. the Bernoulli's terms (bernoulli_nll.cpp) plus L. L and L' near eta = 0 come from a
// series, elsewhere from forms without cancellation or overflow: the element function
// ContinuousBernoulliNll (continuous_bernoulli_nll_kernel.h) has them, run by the shared
// likelihood loop (likelihood.h); -100 and 1e-12 are kBceLogMin and kBceGradEps
// (conventions.h).
// The gradient of the reduced loss for an upstream 1 (with 1/B for mean) is written in
// forward, into a fresh contiguous buffer that autograd saves; backward
// (continuous_bernoulli_nll_backward_) scales its rows in place and skips rows whose scale
// is 1. A float16 element outside float16's normal range is recomputed there from input
// and target, and rounded once after the upstream scaling (row_ops_kernel.h).
//
// dtypes: input float32/float64/bfloat16/float16, computed in float (double for double);
// target any of those, bool or uint8. Loss float32, float64 for float64 input.
// Non-contiguous inputs are copied to contiguous first.
// Determinism: see vaekern_cpu.h (fixed chunks, fixed-order sums).
#include <torch/library.h>

#include "cpu/allocation.h"
#include "cpu/checks.h"
#include "cpu/likelihood.h"
#include "cpu/row_ops.h"

namespace vaekern::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> continuous_bernoulli_nll_cpu(const at::Tensor& input, const at::Tensor& target,
                                                                bool from_logits, int64_t reduction,
                                                                bool compute_grad) {
  check_float(input, "input");
  check_target(target, input);
  check_reduction(reduction);
  const int64_t rows = input.size(0);
  at::Tensor grad = compute_grad ? empty_output(input.sizes(), input.options()) : input.new_empty({0});
  const double grad_scale = reduction == 1 ? 1.0 / static_cast<double>(rows) : 1.0;
  const c10::ScalarType acc = acc_dtype({&input});
  const auto nll = likelihood_rows(kernels().continuous_bernoulli_nll[from_logits], input, target, grad_scale,
                                   compute_grad ? grad : at::Tensor(), acc);
  return {reduce_rows(nll, reduction, acc), grad};
}

void continuous_bernoulli_nll_backward_cpu(const at::Tensor& grad_input, const at::Tensor& grad_out,
                                           const at::Tensor& input, const at::Tensor& target, bool from_logits,
                                           int64_t reduction) {
  if (grad_input.numel() == 0) return;
  check_reduction(reduction);
  const int64_t rows = grad_input.size(0);
  scale_rows_(kernels().continuous_bernoulli_nll_scale_rows[from_logits], grad_input,
              row_values(grad_out, rows, "grad_out"), input, target,
              reduction == 1 ? 1.0 / static_cast<double>(rows) : 1.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(vaekern, CPU, m) {
  m.impl("continuous_bernoulli_nll", &continuous_bernoulli_nll_cpu);
  m.impl("continuous_bernoulli_nll_backward_", &continuous_bernoulli_nll_backward_cpu);
}

}  // namespace vaekern::cpu
