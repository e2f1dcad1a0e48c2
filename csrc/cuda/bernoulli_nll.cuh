// BernoulliNll: the element functor of the Bernoulli likelihood, run by the shared tile
// loop of likelihood.cuh (bernoulli_nll.cu alone, and fused in vae_loss.cu).
//
// Logits l, target t (softplus form: exp never sees a positive argument):
//   nll = max(l, 0) - l*t + log1p(exp(-|l|))          d nll / dl = sigmoid(l) - t
// Probabilities p (logs clamped at -100 as F.binary_cross_entropy):
//   nll = -(t*max(log p, -100) + (1-t)*max(log1p(-p), -100))
//   d nll / dp = (p - t) / max(p*(1-p), 1e-12)
// -100 and 1e-12 are kBceLogMin and kBceGradEps (conventions.h).
#pragma once

#include "common.cuh"
#include "conventions.h"

namespace vaekern {
namespace cuda {

// The loss of one element; *grad gets its derivative (for an upstream gradient of 1). The
// Bernoulli has no per-column parameter: p is 0 and unused (likelihood.cuh).
//
// Logits: sigmoid(x) - t = num / (1 + e) with e = exp(-|x|), num = (1 - t) - t*e for x >= 0
// and (e - t) - t*e below. Where sigmoid(x) and t nearly cancel, 1 - t or e - t is exact
// (Sterbenz) and the fma rounds once, so only the rounding of e itself is left: an absolute
// error of about t*e*6e-8 in float, the size of PyTorch's own float32 gradient error.
// NaN x takes the second branch and gives NaN.
template <bool kFromLogits>
struct BernoulliNll {
  static constexpr bool kColumnParam = false;

  template <typename acc_t>
  __device__ __forceinline__ acc_t operator()(acc_t x, acc_t t, acc_t /*p*/, acc_t* grad) const {
    if constexpr (kFromLogits) {
      const acc_t e = dexp(-dabs(x));  // in (0, 1]: no overflow for any logit
      *grad = dfma(-t, e, x >= acc_t(0) ? acc_t(1) - t : e - t) / (acc_t(1) + e);
      return dfma(-x, t, x > acc_t(0) ? x : acc_t(0)) + dlog1p(e);
    } else {
      const acc_t lp = clamp_min(dlog(x), acc_t(kBceLogMin));
      const acc_t lq = clamp_min(dlog1p(-x), acc_t(kBceLogMin));
      *grad = (x - t) / clamp_min(x * (acc_t(1) - x), acc_t(kBceGradEps));
      return -(t * lp + (acc_t(1) - t) * lq);
    }
  }
};

}  // namespace cuda
}  // namespace vaekern
