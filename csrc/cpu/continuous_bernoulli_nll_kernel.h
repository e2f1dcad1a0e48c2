// The element function of continuous_bernoulli_nll (host code and math:
// continuous_bernoulli_nll.cpp), as the functor that the likelihood loop of
// likelihood_kernel.h runs. from_logits picks the parametrization at compile time;
// kernel_table.h enters both instances.
//
// The nll is the Bernoulli's (bernoulli_nll_kernel.h, whose term functions this reuses)
// plus the negative log normalizer L of the logit eta, and the gradient is the Bernoulli's
// plus L' (times d eta / d lam for probabilities):
//   L(eta) = -log(eta / tanh(eta/2)),   L'(eta) = 1/sinh(eta) - 1/eta.
// For |eta| < R (0.5 in float, 1e-2 in double: kCbSeriesMax) the series in eta^2 (Horner)
//   L  = -log 2 - eta^2/12 + 7 eta^4/1440 - 31 eta^6/90720 + 127 eta^8/4838400 - 73 eta^10/34214400
//   L' = -eta/6 + 7 eta^3/360 - 31 eta^5/15120 + 127 eta^7/604800 - 73 eta^9/3421440
// (truncation below 1e-9 at 0.5, far below double's ulp at 1e-2); elsewhere, with a = |eta|,
//   L = log(tanh(a/2) / a),   L' = 1/sinh(eta) - 1/eta,
// with tanh(a/2) and 1/sinh(a) from the terms each parametrization already has:
//   logits:  e = exp(-a) (the Bernoulli's), r = 1/(1+e), m = 1 - e:
//            tanh(a/2) = m*r, 1/sinh(a) = 2*e*r/m: no overflow for any a (a = inf: L = -inf,
//            L' = 0). m is -expm1(-a) in double, where R = 1e-2 leaves e up to 0.99 and 1 - e
//            would keep only e's absolute error; in float e <= exp(-0.5) and 1 - e is exact
//            to half an ulp.
//   probs:   tanh(eta/2) = 2p - 1 and 1/sinh(eta) = 2p(1-p)/(2p - 1) (from eta = log(p/(1-p))),
//            so no exp or log1p beyond the Bernoulli's logs; eta = log_p - log_q of the
//            clamped logs (finite, |eta| <= 100, at p = 0 and 1, where 2p - 1 = -1 or 1 is
//            tanh(50) to working precision, so the clamp and these forms agree).
//            grad = (p - t + L'(eta)) / max(p(1-p), 1e-12)   (d eta/dp = 1/(p(1-p))).
// Both branches are computed for every lane and one is chosen with blendv. Above R, L'
// subtracts numbers near 1/a and keeps about 6/a^2 ulps less (24 in float at 0.5, 6e4 in
// double at 1e-2), which is why R is larger in float, where the series is exact enough.
// NaN in gives NaN out (a NaN eta fails |eta| < R and takes the direct branch, NaN too).
// Measured against mpmath (50 digits), t = 0, logits +-[1e-12, 316]: the float nll within
// 1.8 eps of max(|nll|, 1) and its gradient within 7.3 eps relative; double 2 and 195 eps
// (the latter just above 1e-2, the cancellation above). From probabilities the gradient's
// error is a few eps of its terms p, t, L' divided by p(1-p): relative, it grows where
// p - t + L' cancels (1.3e-4 in float at p = 0.065, t = 0.3), where the Bernoulli's p - t
// is one rounding.
#pragma once

#include <type_traits>

#include "cpu/bernoulli_nll_kernel.h"
#include "cpu/kernel_utils.h"
#include "cpu/vec_math.h"
#include "conventions.h"

namespace vaekern::cpu::CPU_CAPABILITY {

// Below this |eta| the log normalizer is its series: by the arithmetic type (see above).
template <typename A>
constexpr A kCbSeriesMax = static_cast<A>(std::is_same_v<A, double> ? kCbSeriesMaxDouble : kCbSeriesMaxFloat);

// L(eta) and L'(eta) (l, dl), given a = |eta|, tanh(a/2) and 1/sinh(eta) (signed).
template <typename A>
inline void cb_log_norm(const Vec<A>& eta, const Vec<A>& a, const Vec<A>& tanh_half, const Vec<A>& inv_sinh,
                        Vec<A>& l, Vec<A>& dl) {
  using V = Vec<A>;
  const V y = eta * eta;
  V ls(A(-73.0 / 34214400.0));
  ls = at::vec::fmadd(ls, y, V(A(127.0 / 4838400.0)));
  ls = at::vec::fmadd(ls, y, V(A(-31.0 / 90720.0)));
  ls = at::vec::fmadd(ls, y, V(A(7.0 / 1440.0)));
  ls = at::vec::fmadd(ls, y, V(A(-1.0 / 12.0)));
  ls = at::vec::fmadd(ls, y, V(A(-0.69314718055994530942)));
  V ds(A(-73.0 / 3421440.0));
  ds = at::vec::fmadd(ds, y, V(A(127.0 / 604800.0)));
  ds = at::vec::fmadd(ds, y, V(A(-31.0 / 15120.0)));
  ds = at::vec::fmadd(ds, y, V(A(7.0 / 360.0)));
  ds = at::vec::fmadd(ds, y, V(A(-1.0 / 6.0)));
  ds = ds * eta;
  const V series = a < V(kCbSeriesMax<A>);
  l = V::blendv(vlog(tanh_half / a), ls, series);
  dl = V::blendv(inv_sinh - V(A(1)) / eta, ds, series);
}

template <bool kFromLogits>
struct ContinuousBernoulliNll {
  template <typename A>
  void operator()(const Vec<A>& x, const Vec<A>& t, Vec<A>& nll, Vec<A>& grad) const {
    using V = Vec<A>;
    const V zero(A(0)), one(A(1));
    Vec<A> l, dl;
    if constexpr (kFromLogits) {
      const V a = x.abs();
      const V e = exp_nonpositive(zero - a);
      V r;
      bernoulli_nll_logits(x, t, e, r, nll, grad);
      V m;
      if constexpr (std::is_same_v<A, double>) {
        m = zero - vexpm1(zero - a);
      } else {
        m = one - e;
      }
      const V inv_sinh_a = V(A(2)) * e * r / m;
      cb_log_norm(x, a, m * r, V::blendv(zero - inv_sinh_a, inv_sinh_a, x >= zero), l, dl);
      nll = nll + l;
      grad = grad + dl;
    } else {
      V log_p, log_q, pq;
      bernoulli_nll_probs(x, t, log_p, log_q, pq, nll);
      const V eta = log_p - log_q;
      const V d = (x + x) - one;  // 2p - 1: exact for p >= 1/4
      cb_log_norm(eta, eta.abs(), d.abs(), (pq + pq) / d, l, dl);
      nll = nll + l;
      grad = (x - t + dl) / at::vec::maximum(pq, V(static_cast<A>(kBceGradEps)));
    }
  }
};

}  // namespace vaekern::cpu::CPU_CAPABILITY
