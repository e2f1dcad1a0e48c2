// GaussianNll: the element functor of the Gaussian likelihood, run by the shared tile loop
// of likelihood.cuh (gaussian_nll.cu).
//
// Input x (the mean), target t, and s = log_scale[d], the per-column parameter of
// likelihood.cuh (one value for every column when log_scale is 0-d), sigma = exp(s):
//   nll = 0.5 * (x - t)^2 * exp(-2 s) + s + 0.5 * log(2 pi)      d nll / dx = (x - t) * exp(-2 s)
// The gradient with respect to s is not computed here: the op layer forms it.
// Limits: no clamp. exp(-2 s) overflows for s below about -44 in float (-354 in double),
// and then (x - t) = 0 gives NaN, as the reference does. NaN in any operand gives NaN.
#pragma once

#include "common.cuh"
#include "conventions.h"

namespace vaekern {
namespace cuda {


struct GaussianNll {
  static constexpr bool kColumnParam = true;  // log_scale[d]

  // The loss of one element; *grad gets its derivative (for an upstream gradient of 1).
  template <typename acc_t>
  __device__ __forceinline__ acc_t operator()(acc_t x, acc_t t, acc_t s, acc_t* grad) const {
    const acc_t r = x - t;
    const acc_t g = r * dexp(acc_t(-2) * s);  // exact doubling: one rounding in exp
    *grad = g;
    return dfma(acc_t(0.5) * r, g, s + acc_t(kHalfLog2Pi));
  }
};

// log_scale: on like's device, of the accumulation dtype of an input of dtype `input`,
// () or (D,) (any stride: the kernels read log_scale[d * stride]).
inline void check_log_scale(const Tensor& log_scale, const Tensor& like, at::ScalarType input, int64_t D) {
  check_cuda(log_scale, "log_scale", like);
  const auto acc = acc_scalar(input);
  TORCH_CHECK(log_scale.scalar_type() == acc, "vaekern (cuda): log_scale must have dtype ", acc, " for input of dtype ",
              input, ", got ", log_scale.scalar_type());
  TORCH_CHECK(log_scale.dim() == 0 || (log_scale.dim() == 1 && log_scale.size(0) == D),
              "vaekern (cuda): log_scale must have shape () or (", D, ",) (one per element of a row), got ",
              log_scale.sizes());
}

}  // namespace cuda
}  // namespace vaekern
