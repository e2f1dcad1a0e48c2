// Row operations shared by the op files of csrc/cpu: the task grain of at::parallel_for,
// the per-row values of upstream gradients, the fixed-order reductions over rows, and the
// in-place scaling of a saved gradient's rows (its loop: row_ops_kernel.h).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "cpu/vaekern_cpu.h"

namespace vaekern::cpu {

// Elements one thread should get at least, so that small calls stay on one thread: at
// 128x784 the fused forward takes about 0.1 ms and a parallel region costs several us.
constexpr int64_t kMinElemsPerThread = 32768;

inline int64_t grain(int64_t elems_per_task) {
  return std::max<int64_t>(1, kMinElemsPerThread / std::max<int64_t>(1, elems_per_task));
}

// Elements per row of a (B, ...) tensor.
inline int64_t row_len(const at::Tensor& t) { return t.size(0) == 0 ? 0 : t.numel() / t.size(0); }

// float64 if any tensor is float64, else float32: the dtype of losses (see vaekern/_ops.py).
inline c10::ScalarType acc_dtype(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    if (t->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

// Per-row values of a () or (B,) float tensor (an upstream gradient), as double.
std::vector<double> row_values(const at::Tensor& t, int64_t rows, const char* name);

// mean (1) or sum (2) of per-row values, added in index order.
double reduced_value(const std::vector<double>& rows, int64_t reduction);

// The reduced loss: (B,) for none, () for mean and sum.
at::Tensor reduce_rows(const std::vector<double>& rows, int64_t reduction, c10::ScalarType dtype);

// The ColumnParam of a likelihood's checked per-column parameter p (check_column_param),
// made contiguous into `keep`, which must outlive the kernel; none for an undefined p.
ColumnParam column_param(const at::Tensor& p, at::Tensor& keep);

// grad[b] *= scale[b] in place, skipping rows whose scale is exactly 1. grad is the
// gradient of a likelihood term (kernel: its Kernels entry, such as
// kernels().bernoulli_nll_scale_rows[from_logits]) over input and target (and param, its
// per-column parameter if it takes one), with grad_scale folded in; a float16 element that
// overflowed or lost bits in forward is recomputed from them (row_ops_kernel.h).
void scale_rows_(ScaleRowsKernel kernel, const at::Tensor& grad, const std::vector<double>& scale,
                 const at::Tensor& input, const at::Tensor& target, double grad_scale,
                 const at::Tensor& param = {});

}  // namespace vaekern::cpu
