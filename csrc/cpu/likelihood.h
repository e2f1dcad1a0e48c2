// The likelihood term on CPU, shared by every op that has one (bernoulli_nll.cpp,
// vae_loss.cpp): per-row sums of an element function over (input, target), with its
// gradient written in the same pass. The vectorized loop, and how a likelihood plugs into
// it (one element functor), are in likelihood_kernel.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "cpu/vaekern_cpu.h"

namespace vaekern::cpu {

// Per-row sums of the element values, by `kernel` (an entry of the Kernels table, such as
// kernels().bernoulli_nll[from_logits]), computed in acc (the loss dtype: float, or double
// for a float64 input or loss). Writes d(value)/d(input) times grad_scale into grad when
// grad is defined (contiguous, input's shape and dtype). Non-contiguous inputs are copied
// to contiguous first. param: the likelihood's per-column parameter, if it takes one, in
// acc (checked by the op: check_column_param), else undefined.
std::vector<double> likelihood_rows(LikelihoodKernel kernel, const at::Tensor& input, const at::Tensor& target,
                                    double grad_scale, const at::Tensor& grad, c10::ScalarType acc,
                                    const at::Tensor& param = {});

}  // namespace vaekern::cpu
