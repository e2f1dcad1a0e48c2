// Argument checks shared by the op files of csrc/cpu (<op>.cpp): device, dtype, shape and
// reduction, with the messages the Python side shows.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/accumulate.h>

namespace vaekern::cpu {

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

inline void check_target(const at::Tensor& target, const at::Tensor& input) {
  TORCH_CHECK(target.device().is_cpu(), "vaekern (cpu): target must be a CPU tensor, got ", target.device());
  const auto t = target.scalar_type();
  TORCH_CHECK(is_float(t) || t == at::kBool || t == at::kByte,
              "vaekern (cpu): target must be floating, bool or uint8, got ", t);
  TORCH_CHECK(target.sizes() == input.sizes(), "vaekern (cpu): target has shape ", target.sizes(),
              " but input has shape ", input.sizes());
}

// A likelihood's per-column parameter (the Gaussian's log_scale), as the op layer passes
// it: 0-d (one value for every element), or 1-d with one value per element of a row of
// input (D = numel of input.shape[1:], the op layer's broadcast flattened), in acc, the
// accumulation dtype that the kernel computes in (float32; float64 for float64 input).
inline void check_column_param(const at::Tensor& p, const at::Tensor& input, c10::ScalarType acc, const char* name) {
  TORCH_CHECK(p.device().is_cpu(), "vaekern (cpu): ", name, " must be a CPU tensor, got ", p.device());
  TORCH_CHECK(p.scalar_type() == acc, "vaekern (cpu): ", name, " must be ", acc,
              " (the accumulation dtype of a ", input.scalar_type(), " input), got ", p.scalar_type());
  const int64_t cols = c10::multiply_integers(input.sizes().slice(1));
  TORCH_CHECK(p.dim() == 0 || (p.dim() == 1 && p.size(0) == cols), "vaekern (cpu): ", name,
              " must be 0-d or 1-d with D = ", cols, " elements (one per element of a row of input, shape ",
              input.sizes().slice(1), "), got shape ", p.sizes());
}

}  // namespace vaekern::cpu
