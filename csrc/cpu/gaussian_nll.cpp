// gaussian_nll on CPU: the Gaussian negative log-likelihood and, in the same pass, its
// gradient with respect to the input (the mean).
//
// Math (x input, t target, s = log_scale[d] for column d of the flattened row, sigma =
// exp(s); per element, summed over each row):
//   nll = 0.5 * (x - t)^2 * exp(-2s) + s + 0.5*log(2 pi),    d nll/dx = (x - t) * exp(-2s)
// No clamp. The element function is GaussianNll (gaussian_nll_kernel.h, which says how it
// is evaluated and its limits), run by the shared likelihood loop (likelihood.h) with
// log_scale as its per-column parameter.
// log_scale comes from the op layer (vaekern/_ops/gaussian_nll.py) in the accumulation
// dtype (float32; float64 for float64 input), 0-d or 1-d with D = numel / B elements: the
// user's log_scale broadcast to input.shape[1:] and flattened. Its gradient is not a kernel
// output: the op layer computes it.
// The gradient of the reduced loss for an upstream 1 (with 1/B for mean) is written in
// forward, into a fresh contiguous buffer that autograd saves; backward
// (gaussian_nll_backward_) scales its rows in place and skips rows whose scale is 1. A
// float16 element outside float16's normal range is recomputed there from input, target
// and log_scale, and rounded once after the upstream scaling (row_ops_kernel.h).
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

std::tuple<at::Tensor, at::Tensor> gaussian_nll_cpu(const at::Tensor& input, const at::Tensor& target,
                                                    const at::Tensor& log_scale, int64_t reduction,
                                                    bool compute_grad) {
  check_float(input, "input");
  check_target(target, input);
  const c10::ScalarType acc = acc_dtype({&input});
  check_column_param(log_scale, input, acc, "log_scale");
  check_reduction(reduction);
  const int64_t rows = input.size(0);
  at::Tensor grad = compute_grad ? empty_output(input.sizes(), input.options()) : input.new_empty({0});
  const double grad_scale = reduction == 1 ? 1.0 / static_cast<double>(rows) : 1.0;
  const auto nll = likelihood_rows(kernels().gaussian_nll, input, target, grad_scale,
                                   compute_grad ? grad : at::Tensor(), acc, log_scale);
  return {reduce_rows(nll, reduction, acc), grad};
}

void gaussian_nll_backward_cpu(const at::Tensor& grad_input, const at::Tensor& grad_out, const at::Tensor& input,
                               const at::Tensor& target, const at::Tensor& log_scale, int64_t reduction) {
  if (grad_input.numel() == 0) return;
  check_reduction(reduction);
  // The float16 recompute reads log_scale in float, the accumulation dtype of float16.
  check_column_param(log_scale, input, acc_dtype({&input}), "log_scale");
  const int64_t rows = grad_input.size(0);
  scale_rows_(kernels().gaussian_nll_scale_rows, grad_input, row_values(grad_out, rows, "grad_out"), input, target,
              reduction == 1 ? 1.0 / static_cast<double>(rows) : 1.0, log_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(vaekern, CPU, m) {
  m.impl("gaussian_nll", &gaussian_nll_cpu);
  m.impl("gaussian_nll_backward_", &gaussian_nll_backward_cpu);
}

}  // namespace vaekern::cpu
