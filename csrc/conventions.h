// The numeric limits of vaekern's conventions, defined once for csrc/cpu, csrc/cuda and the
// autograd; vaekern/reference.py states them and tests/test_limits.py ties these to it.
#pragma once

namespace vaekern {

// KL: the variance is exp(min(logvar, kLogvarMax)), so float32 cannot overflow (exp(88.7) does).
constexpr double kLogvarMax = 60.0;
// Bernoulli NLL from probabilities: each log is clamped here, as F.binary_cross_entropy does.
constexpr double kBceLogMin = -100.0;
// Bernoulli NLL from probabilities: the gradient is (p - t) / max(p(1-p), kBceGradEps).
constexpr double kBceGradEps = 1e-12;

}  // namespace vaekern
