// ContinuousBernoulliNll: the element functor of the continuous Bernoulli likelihood
// (Loaiza-Ganem & Cunningham 2019), run by the shared tile loop of likelihood.cuh
// (continuous_bernoulli_nll.cu). It is the Bernoulli's (BernoulliNll, bernoulli_nll.cuh)
// plus the negative log normalizer L of the logit eta:
//   L(eta) = -log C(eta) = -log(eta / tanh(eta / 2))
//   L'(eta) = 1/sinh(eta) - 1/eta
// Logits eta (from_logits):
//   nll = [max(eta, 0) - eta*t + log1p(exp(-|eta|))] + L(eta)
//   d nll / d eta = [sigmoid(eta) - t] + L'(eta)
// Probabilities lam, with the clamped logs of BernoulliNll (kBceLogMin, kBceGradEps):
//   lp = max(log lam, -100), lq = max(log1p(-lam), -100), eta = lp - lq (in [-100, 100])
//   nll = -(t*lp + (1-t)*lq) + L(eta)
//   d nll / d lam = (lam - t + L'(eta)) / max(lam*(1-lam), 1e-12)
//
// L without cancellation or overflow (cb_log_norm): a series in eta^2 for |eta| below
// kCbSeriesMax (0.5 in float math, 1e-2 in double), else, with a = |eta|, e = exp(-a),
//   L = -log(a) + log1p(-e) - log1p(e)              (log tanh(a/2) = log((1-e)/(1+e)))
//   L' = sign(eta) * (2e/(1 - e*e) - 1/a)           (2e/(1-e^2) = 1/sinh(a): e <= 1, no overflow)
// Above the threshold the direct L' subtracts two numbers near 1/a and loses about 6/a^2
// ulps: harmless at 0.5 in float and at 1e-2 in double, and the series is exact to below
// 1e-9 (float) and far below 1e-16 (double) under each. vaekern.reference uses the same
// split for float64.
// Limits: eta = +-inf gives L = -inf and L' = 0; the Bernoulli part is then inf, or NaN
// (inf - inf) for t = 1, as in the reference. NaN in gives NaN (it fails the series
// compare and takes the direct branch).
#pragma once

#include "bernoulli_nll.cuh"
#include "common.cuh"
#include "conventions.h"

namespace vaekern {
namespace cuda {

// |eta| below which L and L' come from their series (see above): by the math type.
template <typename acc_t>
struct CbSeriesMax;
template <>
struct CbSeriesMax<float> { static constexpr float value = static_cast<float>(kCbSeriesMaxFloat); };
template <>
struct CbSeriesMax<double> { static constexpr double value = kCbSeriesMaxDouble; };

constexpr double kLog2 = 0.69314718055994530942;

// L(eta) = -log(eta / tanh(eta / 2)); *dl gets L'(eta).
template <typename acc_t>
__device__ __forceinline__ acc_t cb_log_norm(acc_t eta, acc_t* dl) {
  const acc_t a = dabs(eta);
  if (a < CbSeriesMax<acc_t>::value) {
    // Horner in u = eta^2 (coefficients from the Taylor series of L, checked with sympy).
    const acc_t u = eta * eta;
    acc_t d = acc_t(-73.0 / 3421440.0);
    d = dfma(d, u, acc_t(127.0 / 604800.0));
    d = dfma(d, u, acc_t(-31.0 / 15120.0));
    d = dfma(d, u, acc_t(7.0 / 360.0));
    d = dfma(d, u, acc_t(-1.0 / 6.0));
    *dl = d * eta;
    acc_t l = acc_t(-73.0 / 34214400.0);
    l = dfma(l, u, acc_t(127.0 / 4838400.0));
    l = dfma(l, u, acc_t(-31.0 / 90720.0));
    l = dfma(l, u, acc_t(7.0 / 1440.0));
    l = dfma(l, u, acc_t(-1.0 / 12.0));
    return dfma(l, u, acc_t(-kLog2));
  }
  const acc_t e = dexp(-a);  // in [0, 1): a >= kCbSeriesMax > 0
  const acc_t d = acc_t(2) * e / (acc_t(1) - e * e) - acc_t(1) / a;
  *dl = eta < acc_t(0) ? -d : d;
  return dlog1p(-e) - dlog1p(e) - dlog(a);
}

template <bool kFromLogits>
struct ContinuousBernoulliNll {
  static constexpr bool kColumnParam = false;

  // The loss of one element; *grad gets its derivative (for an upstream gradient of 1).
  template <typename acc_t>
  __device__ __forceinline__ acc_t operator()(acc_t x, acc_t t, acc_t p, acc_t* grad) const {
    acc_t g;
    const acc_t bce = BernoulliNll<kFromLogits>{}(x, t, p, &g);
    acc_t dl;
    if constexpr (kFromLogits) {
      const acc_t l = cb_log_norm(x, &dl);
      *grad = g + dl;
      return bce + l;
    } else {
      // The logit of BernoulliNll's clamped logs (the compiler shares the logs with it).
      const acc_t eta = clamp_min(dlog(x), acc_t(kBceLogMin)) - clamp_min(dlog1p(-x), acc_t(kBceLogMin));
      const acc_t l = cb_log_norm(eta, &dl);
      // (lam - t + L') / den: BernoulliNll's (lam - t) / den plus L' * d eta / d lam.
      *grad = g + dl / clamp_min(x * (acc_t(1) - x), acc_t(kBceGradEps));
      return bce + l;
    }
  }
};

}  // namespace cuda
}  // namespace vaekern
