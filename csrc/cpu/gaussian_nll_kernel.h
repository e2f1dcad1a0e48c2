// The element function of gaussian_nll (host code and math: gaussian_nll.cpp), as the
// functor that the likelihood loop of likelihood_kernel.h runs, with the per-column
// parameter s = log_scale[d] (kColumnParam: one value per column of the flattened row, or
// one for all).
//
// Per element, input x, target t, s = log_scale, sigma = exp(s):
//   nll  = 0.5 * (x - t)^2 * exp(-2s) + s + 0.5*log(2 pi)
//   grad = (x - t) * exp(-2s)
// computed as z = (x - t) * exp(-s), nll = 0.5*z*z + (s + 0.5 log 2pi), grad = z * exp(-s):
// the same value, but neither (x - t)^2 nor exp(-2s) (inf for s < -44 in float) is formed,
// so within exp(-s)'s own range the float result is inf only where the true value is
// beyond float's. One vectorized exp per element (vec_math.h's vexp in float, Sleef in
// double); no clamp.
// Limits (float): exp(-s) is inf for s < -88.7, so there the gradient is inf, or NaN where
// x == t (0 * inf); it is 0 for s > 87.3 (sigma > 8e37), so the quadratic term is 0 there,
// and NaN for an infinite x - t. NaN in any of x, t, s gives NaN.
#pragma once

#include "cpu/kernel_utils.h"
#include "cpu/vec_math.h"
#include "conventions.h"

namespace vaekern::cpu::CPU_CAPABILITY {


struct GaussianNll {
  static constexpr bool kColumnParam = true;

  template <typename A>
  void operator()(const Vec<A>& x, const Vec<A>& t, const Vec<A>& log_scale, Vec<A>& nll, Vec<A>& grad) const {
    const Vec<A> inv_sigma = vexp(Vec<A>(A(0)) - log_scale);
    const Vec<A> z = (x - t) * inv_sigma;
    nll = at::vec::fmadd(Vec<A>(A(0.5)) * z, z, log_scale + Vec<A>(static_cast<A>(kHalfLog2Pi)));
    grad = z * inv_sigma;
  }
};

}  // namespace vaekern::cpu::CPU_CAPABILITY
