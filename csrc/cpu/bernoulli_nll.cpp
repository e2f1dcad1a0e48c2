// bernoulli_nll on CPU: the Bernoulli negative log-likelihood and, in the same pass, its
// gradient.
//
// Math (l logits, p probabilities, t targets; per element, summed over each row):
//   logits: nll = max(l, 0) - l*t + log1p(exp(-|l|)),     d nll/dl = sigmoid(l) - t
//   probs:  nll = -(t*max(log p, -100) + (1-t)*max(log1p(-p), -100)),
//           d nll/dp = (p - t) / max(p*(1-p), 1e-12)      (F.binary_cross_entropy's)
// The element function is BernoulliNll (bernoulli_nll_kernel.h), run by the shared
// likelihood loop (likelihood.h); -100 and 1e-12 are kBceLogMin and kBceGradEps
// (conventions.h).
// The gradient of the reduced loss for an upstream 1 (with 1/B for mean) is written in
// forward, into a fresh contiguous buffer that autograd saves; backward
// (bernoulli_nll_backward_) scales its rows in place and skips rows whose scale is 1. A
// float16 element outside float16's normal range (its forward value overflowed, or is a
// subnormal that lost bits) is recomputed there from input and target, and rounded once
// after the upstream scaling (row_ops_kernel.h).
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

std::tuple<at::Tensor, at::Tensor> bernoulli_nll_cpu(const at::Tensor& input, const at::Tensor& target,
                                                     bool from_logits, int64_t reduction, bool compute_grad) {
  check_float(input, "input");
  check_target(target, input);
  check_reduction(reduction);
  const int64_t rows = input.size(0);
  at::Tensor grad = compute_grad ? empty_output(input.sizes(), input.options()) : input.new_empty({0});
  const double grad_scale = reduction == 1 ? 1.0 / static_cast<double>(rows) : 1.0;
  const c10::ScalarType acc = acc_dtype({&input});
  const auto nll = likelihood_rows(kernels().bernoulli_nll[from_logits], input, target, grad_scale,
                                   compute_grad ? grad : at::Tensor(), acc);
  return {reduce_rows(nll, reduction, acc), grad};
}

void bernoulli_nll_backward_cpu(const at::Tensor& grad_input, const at::Tensor& grad_out, const at::Tensor& input,
                                const at::Tensor& target, bool from_logits, int64_t reduction) {
  if (grad_input.numel() == 0) return;
  check_reduction(reduction);
  const int64_t rows = grad_input.size(0);
  scale_rows_(kernels().bernoulli_nll_scale_rows[from_logits], grad_input, row_values(grad_out, rows, "grad_out"),
              input, target, reduction == 1 ? 1.0 / static_cast<double>(rows) : 1.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(vaekern, CPU, m) {
  m.impl("bernoulli_nll", &bernoulli_nll_cpu);
  m.impl("bernoulli_nll_backward_", &bernoulli_nll_backward_cpu);
}

}  // namespace vaekern::cpu
