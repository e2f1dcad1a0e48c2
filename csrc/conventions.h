// The numeric limits of vaekern's conventions, defined once for csrc/cpu, csrc/cuda and the
// autograd; vaekern/reference.py states them and tests/test_limits.py ties these to it. And
// one code of the kernels' interface that all three read.
#pragma once

#include <cstdint>

namespace vaekern {

// gaussian_kl's own reduction beside none (0), mean (1) and sum (2): the KL of each latent
// element summed over the rows (vaekern/_ops/_common.py KL_COLUMNS; tests/test_limits.py).
constexpr int64_t kKlColumns = 3;

// KL: the variance is exp(min(logvar, kLogvarMax)), so float32 cannot overflow (exp(88.7) does).
constexpr double kLogvarMax = 60.0;
// Bernoulli NLL from probabilities: each log is clamped here, as F.binary_cross_entropy does.
constexpr double kBceLogMin = -100.0;
// Bernoulli NLL from probabilities: the gradient is (p - t) / max(p(1-p), kBceGradEps).
constexpr double kBceGradEps = 1e-12;
// Continuous Bernoulli: its log normalizer L(eta) takes the series in eta^2 below |eta| = the
// threshold of the math type, the direct form above (the float one has no reference
// counterpart, the reference being float64: the test ties it to Triton's).
constexpr double kCbSeriesMaxFloat = 0.5;
constexpr double kCbSeriesMaxDouble = 1e-2;
// Gaussian NLL: its normalizing constant per element, 0.5 * log(2 pi), correctly rounded.
constexpr double kHalfLog2Pi = 0.91893853320467274178;

}  // namespace vaekern
