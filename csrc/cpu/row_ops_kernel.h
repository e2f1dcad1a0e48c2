// The vectorized loop of scale_rows_ (host code: row_ops.cpp).
//
// grad[row] *= scale[row] in place, skipping rows whose scale is exactly 1 (the usual
// backward). Templated on the likelihood Elem whose gradient grad holds (the functor of
// likelihood_kernel.h, with its per-column parameter if it takes one): a float16 element
// outside float16's normal range is recomputed with Elem in float, times grad_scale and
// the row's scale, and rounded once. Forward
// stored the gradient for an upstream of 1 (with 1/B for mean): beyond 65504 it
// overflowed to inf, where an upstream below 1 (a loss weight) brings it back, and below
// 2^-14 it is a subnormal with fewer than 11 bits, or 0, where a GradScaler's upstream
// (65536) would have kept them all. Only float16 has a narrower range than its float
// math (bfloat16 has float's); the check costs two compares per vector, and the
// recompute reads input and target only for vectors that need it, in rows that are
// scaled at all.
#pragma once

#include <limits>

#include "cpu/kernel_utils.h"

namespace vaekern::cpu::CPU_CAPABILITY {

// Elem void: scale only.
template <typename Elem, typename T, typename tgt_t>
void scale_rows_tasks(const ScaleRowsArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  constexpr int64_t W = Vec<A>::size();
  constexpr int kNoLane = (1 << W) - 1;  // zero_mask() of a mask with no lane set
  const Vec<A> half_max(static_cast<A>(std::numeric_limits<c10::Half>::max()));
  const Vec<A> half_min_normal(static_cast<A>(std::numeric_limits<c10::Half>::min()));
  for (int64_t task = begin; task < end; ++task) {
    const int64_t row = task / a.chunks;
    const double s = a.scale[row];
    if (s == 1.0) continue;
    const Vec<A> sv(static_cast<A>(s));
    const int64_t c0 = (task % a.chunks) * kChunk;
    const int64_t c1 = std::min(a.cols, c0 + kChunk);
    const int64_t off = row * a.cols;
    T* g = static_cast<T*>(a.grad) + off;
    for (int64_t j = c0; j < c1; j += W) {
      const int64_t n = std::min(W, c1 - j);
      const Vec<A> v = load_as<A>(g + j, n);
      Vec<A> out = v * sv;
      if constexpr (!std::is_void_v<Elem>) {
        const Vec<A> mag = v.abs();
        const Vec<A> lost = (mag > half_max) | (mag < half_min_normal);  // NaN: neither, it stays
        if (lost.zero_mask() != kNoLane) {
          Vec<A> value, grad;
          run_elem(Elem{}, load_as<A>(static_cast<const T*>(a.input) + off + j, n),
                   load_as<A>(static_cast<const tgt_t*>(a.target) + off + j, n), a.param, j, n, value, grad);
          out = Vec<A>::blendv(out, grad * Vec<A>(static_cast<A>(a.grad_scale)) * sv, lost);
        }
      }
      store_as<A>(out, g + j, n);
    }
  }
}

template <typename Elem>
void scale_rows_kernel(const ScaleRowsArgs& a, int64_t begin, int64_t end) {
  if (a.input != nullptr && a.dtype == c10::ScalarType::Half) {
    dispatch_target(a.target_dtype,
                    [&](auto tgt) { scale_rows_tasks<Elem, c10::Half, decltype(tgt)>(a, begin, end); });
    return;
  }
  dispatch_float(a.dtype, [&](auto v) { scale_rows_tasks<void, decltype(v), float>(a, begin, end); });
}

}  // namespace vaekern::cpu::CPU_CAPABILITY
