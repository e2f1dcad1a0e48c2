// The vectorized loop of scale_rows_ (host code: row_ops.cpp).
#pragma once

#include "cpu/kernel_utils.h"

namespace vaekern::cpu::CPU_CAPABILITY {

// grad[row] *= scale[row], skipping rows whose scale is exactly 1 (the usual backward).
template <typename T>
void scale_rows_tasks(const ScaleRowsArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  constexpr int64_t W = Vec<A>::size();
  for (int64_t task = begin; task < end; ++task) {
    const int64_t row = task / a.chunks;
    const double s = a.scale[row];
    if (s == 1.0) continue;
    const Vec<A> sv(static_cast<A>(s));
    const int64_t c0 = (task % a.chunks) * kChunk;
    const int64_t c1 = std::min(a.cols, c0 + kChunk);
    T* g = static_cast<T*>(a.grad) + row * a.cols;
    for (int64_t j = c0; j < c1; j += W) {
      const int64_t n = std::min(W, c1 - j);
      store_as<A>(load_as<A>(g + j, n) * sv, g + j, n);
    }
  }
}

inline void scale_rows_kernel(const ScaleRowsArgs& a, int64_t begin, int64_t end) {
  dispatch_float(a.dtype, [&](auto v) { scale_rows_tasks<decltype(v)>(a, begin, end); });
}

}  // namespace vaekern::cpu::CPU_CAPABILITY
