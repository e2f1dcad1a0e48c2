// The element function of bernoulli_nll (host code and math: bernoulli_nll.cpp), as the
// functor that the likelihood loop of likelihood_kernel.h runs: value and d/dinput of one
// vector of elements. from_logits picks the parametrization at compile time; kernel_table.h
// enters both instances. The terms of each parametrization are functions of their own,
// which continuous_bernoulli_nll_kernel.h reuses.
//
// Per element, logits l and target t, with e = exp(-|l|) computed once:
//   nll  = max(l, 0) - l*t + log1p(e)
//   grad = sigmoid(l) - t,   sigmoid(l) = r or e*r for l >= 0 or l < 0, r = 1/(1+e)
// log1p(e) is log(u) + (e - (u - 1)) / u with u = fl(1 + e): u - 1 is exact, and the
// second term restores what rounding 1 + e lost (the classic log1p correction). So each
// element costs one vectorized exp, one log and one division (no log1p: PyTorch's costs
// 11 ns/elem on this machine). exp and log are inline polynomials for the only ranges
// they see here, exp on (-inf, 0] and log on [1, 2] (vec_math.h); each is within 1 ulp,
// and log1p(e) within 2 ulp for every e in (0, 1] (measured over 1.3M logits).
//
// Probabilities p: nll = -(t*max(log p, -100) + (1-t)*max(log1p(-p), -100)) with the
// same correction for log1p(-p); grad = (p - t) / max(p*(1-p), 1e-12). The two limits are
// kBceLogMin and kBceGradEps (conventions.h).
// at::vec::maximum propagates NaN, so a NaN input gives a NaN loss and gradient.
#pragma once

#include "cpu/kernel_utils.h"
#include "cpu/vec_math.h"
#include "conventions.h"

namespace vaekern::cpu::CPU_CAPABILITY {

// The terms from logits x, given e = exp(-|x|) (ContinuousBernoulliNll needs e too):
// nll, grad = sigmoid(x) - t, and r = 1/(1+e).
template <typename A>
inline void bernoulli_nll_logits(const Vec<A>& x, const Vec<A>& t, const Vec<A>& e, Vec<A>& r, Vec<A>& nll,
                                 Vec<A>& grad) {
  const Vec<A> zero(A(0)), one(A(1));
  const Vec<A> u = one + e;
  r = one / u;
  const Vec<A> log1p_e = log_1_to_2(u) + (e - (u - one)) * r;
  nll = at::vec::maximum(x, zero) - x * t + log1p_e;
  // sigmoid(l) - t over the common denominator u: ((1-t) - t*e) / u for l >= 0,
  // (e*(1-t) - t) / u for l < 0. Where the difference cancels (t near sigmoid(l)), the
  // numerator is one fused multiply-add of exact or nearly exact terms, so the gradient
  // keeps about 3x more correct bits than sigmoid(l) - t rounded twice.
  const Vec<A> one_m_t = one - t;
  const Vec<A> num = Vec<A>::blendv(at::vec::fmadd(e, one_m_t, zero - t), at::vec::fmadd(zero - t, e, one_m_t),
                                    x >= zero);
  grad = num * r;
}

// The terms from probabilities x: nll, the clamped logs log_p = max(log x, -100) and
// log_q = max(log1p(-x), -100), and pq = x*(1-x), the gradient's denominator before its
// clamp (ContinuousBernoulliNll needs all of them).
template <typename A>
inline void bernoulli_nll_probs(const Vec<A>& x, const Vec<A>& t, Vec<A>& log_p, Vec<A>& log_q, Vec<A>& pq,
                                Vec<A>& nll) {
  const Vec<A> zero(A(0)), one(A(1));
  const Vec<A> log_min(static_cast<A>(kBceLogMin));
  const Vec<A> q = one - x;
  // log1p(-p); the correction is 0/0 at p = 1, where log(q) = -inf is already right.
  const Vec<A> corr = Vec<A>::blendv(((zero - x) - (q - one)) / q, zero, q == zero);
  log_p = at::vec::maximum(vlog(x), log_min);
  log_q = at::vec::maximum(vlog(q) + corr, log_min);
  nll = zero - (t * log_p + (one - t) * log_q);
  pq = x * q;
}

template <bool kFromLogits>
struct BernoulliNll {
  template <typename A>
  void operator()(const Vec<A>& x, const Vec<A>& t, Vec<A>& nll, Vec<A>& grad) const {
    if constexpr (kFromLogits) {
      Vec<A> r;
      bernoulli_nll_logits(x, t, exp_nonpositive(Vec<A>(A(0)) - x.abs()), r, nll, grad);
    } else {
      Vec<A> log_p, log_q, pq;
      bernoulli_nll_probs(x, t, log_p, log_q, pq, nll);
      grad = (x - t) / at::vec::maximum(pq, Vec<A>(static_cast<A>(kBceGradEps)));
    }
  }
};

}  // namespace vaekern::cpu::CPU_CAPABILITY
