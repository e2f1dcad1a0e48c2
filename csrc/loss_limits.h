// The numeric limits of the losses, defined once for C++: csrc/cpu and csrc/cuda both
// include this header. They are vaekern/reference.py's LOGVAR_MAX, BCE_LOG_MIN and
// BCE_GRAD_EPS, and tests/test_limits.py checks that the values agree.
//
// (Not named limits.h: with csrc on the include path, that name would shadow the C
// library's <limits.h>, which <climits> includes.)
#pragma once

namespace vaekern {

// Gaussian KL: the variance is exp(min(lv, kLogvarMax)), so that float32 cannot overflow
// for any logvar (exp(88.7) already does). The clamp is straight-through: d kl / d lv =
// 0.5 * (exp(min(lv, kLogvarMax)) - 1) keeps the clamped variance's sign and size.
inline constexpr double kLogvarMax = 60.0;

// Bernoulli NLL with probabilities p: each log is clamped below at kBceLogMin, as in
// F.binary_cross_entropy:  nll = -(t*max(log p, kBceLogMin) + (1-t)*max(log1p(-p), kBceLogMin)).
inline constexpr double kBceLogMin = -100.0;

// Its gradient, (p - t) / max(p*(1-p), kBceGradEps), stays finite at p = 0 and p = 1:
// aten's binary_cross_entropy_backward uses the same floor (EPSILON).
inline constexpr double kBceGradEps = 1e-12;

}  // namespace vaekern
