// Host-side helpers shared by the op files of csrc/cpu (checks, task grids, row
// reductions). The kernels they launch are in <op>_kernel.h; see vaekern_cpu.h.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>
#include <vector>

#include "cpu/vaekern_cpu.h"

namespace vaekern::cpu {

// Elements one thread should get at least, so that small calls stay on one thread: at
// 128x784 the fused forward takes about 0.1 ms and a parallel region costs several us.
constexpr int64_t kMinElemsPerThread = 32768;

inline bool is_float(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "vaekern (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(is_float(t.scalar_type()), "vaekern (cpu): ", name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1, "vaekern (cpu): ", name, " must have a batch dim (dim 0)");
}

inline void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "vaekern (cpu): reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
}

inline void check_latents(const at::Tensor& mu, const at::Tensor& logvar) {
  check_float(mu, "mu");
  check_float(logvar, "logvar");
  TORCH_CHECK(mu.sizes() == logvar.sizes(), "vaekern (cpu): logvar has shape ", logvar.sizes(), " but mu has shape ",
              mu.sizes());
  TORCH_CHECK(mu.scalar_type() == logvar.scalar_type(), "vaekern (cpu): logvar has dtype ", logvar.scalar_type(),
              " but mu has dtype ", mu.scalar_type());
}

// float64 if any tensor is float64, else float32: the dtype of losses (see vaekern/_ops.py).
inline c10::ScalarType acc_dtype(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    if (t->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

inline void check_target(const at::Tensor& target, const at::Tensor& input) {
  TORCH_CHECK(target.device().is_cpu(), "vaekern (cpu): target must be a CPU tensor, got ", target.device());
  const auto t = target.scalar_type();
  TORCH_CHECK(is_float(t) || t == at::kBool || t == at::kByte,
              "vaekern (cpu): target must be floating, bool or uint8, got ", t);
  TORCH_CHECK(target.sizes() == input.sizes(), "vaekern (cpu): target has shape ", target.sizes(),
              " but input has shape ", input.sizes());
}

inline int64_t row_len(const at::Tensor& t) { return t.size(0) == 0 ? 0 : t.numel() / t.size(0); }

inline int64_t grain(int64_t elems_per_task) {
  return std::max<int64_t>(1, kMinElemsPerThread / std::max<int64_t>(1, elems_per_task));
}

// at::empty, except that a large buffer is put on transparent huge pages (Linux): a fresh
// 4096x3072 float32 buffer costs 32 ms of 4 KiB page faults on first write on the 2-core
// EPYC VM where the kernels were tuned, 3 ms on 2 MiB pages (its whole fused forward is
// about 15 ms). PyTorch does the same for every allocation under THP_MEM_ALLOC_ENABLE=1.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Per-row values of a () or (B,) float tensor (an upstream gradient), as double.
std::vector<double> row_values(const at::Tensor& t, int64_t rows, const char* name);

// mean (1) or sum (2) of per-row values, added in index order.
double reduced_value(const std::vector<double>& rows, int64_t reduction);

// The reduced loss: (B,) for none, () for mean and sum.
at::Tensor reduce_rows(const std::vector<double>& rows, int64_t reduction, c10::ScalarType dtype);

// Per-row NLL sums; writes the gradient (times grad_scale) into grad when it is defined.
std::vector<double> bernoulli_nll_rows(const at::Tensor& input, const at::Tensor& target, bool from_logits,
                                       double grad_scale, const at::Tensor& grad);

// grad[b] *= scale[b] in place, skipping rows whose scale is exactly 1.
void scale_rows_(const at::Tensor& grad, const std::vector<double>& scale);

// Per-row KL sums.
std::vector<double> gaussian_kl_rows(const at::Tensor& mu, const at::Tensor& logvar);

// (scale[b] * d kl_b / d mu, scale[b] * d kl_b / d logvar), contiguous.
std::tuple<at::Tensor, at::Tensor> gaussian_kl_grads(const std::vector<double>& scale, const at::Tensor& mu,
                                                     const at::Tensor& logvar);

}  // namespace vaekern::cpu
