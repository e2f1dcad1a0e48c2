// Helpers for the vectorized loops of <op>_kernel.h. Included only by capability/*.cpp,
// after CPU_CAPABILITY names the instruction set (DEFAULT, AVX2, AVX512), so that every
// name here lives in a namespace of its own per capability, like at::vec does.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu/vaekern_cpu.h"

namespace vaekern::cpu::CPU_CAPABILITY {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Arithmetic type for an input dtype: double for double, float for everything else.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Calls f(A{}) for the arithmetic type that acc names (kFloat or kDouble), for inputs of
// type T: a float64 loss computes float32 inputs in double, so that a term beyond float's
// range stays finite. A double input is never computed in float.
template <typename T, typename F>
inline void dispatch_acc(c10::ScalarType acc, F&& f) {
  if (acc == c10::ScalarType::Double) return f(double{});
  if constexpr (!std::is_same_v<T, double>) return f(float{});
}

// Loads n <= Vec<A>::size() elements of src_t as A; lanes past n are zero.
template <typename A, typename src_t>
inline Vec<A> load_as(const src_t* p, int64_t n) {
  if constexpr (std::is_same_v<A, src_t>) {
    return n == Vec<A>::size() ? Vec<A>::loadu(p) : Vec<A>::loadu(p, n);
  } else {
    alignas(64) A buf[Vec<A>::size()] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(p[i]);
    return Vec<A>::loadu(buf);
  }
}

// Stores the first n lanes of v as dst_t (rounding to nearest even for bf16/fp16).
template <typename A, typename dst_t>
inline void store_as(const Vec<A>& v, dst_t* p, int64_t n) {
  if constexpr (std::is_same_v<A, dst_t>) {
    if (n == Vec<A>::size()) v.store(p); else v.store(p, n);
  } else {
    alignas(64) A buf[Vec<A>::size()];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<dst_t>(buf[i]);
  }
}

// The lanes of a float vector as doubles: lanes [0, W/2) and [W/2, W).
inline std::pair<Vec<double>, Vec<double>> widen(const Vec<float>& v) {
  static_assert(Vec<float>::size() == 2 * Vec<double>::size());
  alignas(64) float f[Vec<float>::size()];
  alignas(64) double d[Vec<float>::size()];
  v.store(f);
  for (int64_t i = 0; i < Vec<float>::size(); ++i) d[i] = f[i];
  return {Vec<double>::loadu(d), Vec<double>::loadu(d + Vec<double>::size())};
}

// Sum of the lanes in lane order, in double.
template <typename A>
inline double hsum(const Vec<A>& v) {
  alignas(64) A buf[Vec<A>::size()];
  v.store(buf);
  double s = 0;
  for (int64_t i = 0; i < Vec<A>::size(); ++i) s += static_cast<double>(buf[i]);
  return s;
}

// A likelihood functor (likelihood_kernel.h) that takes a per-column parameter declares
// `static constexpr bool kColumnParam = true;`; its operator() then takes the parameter's
// vector between the target and the outputs.
template <typename Elem>
concept TakesColumnParam = requires { requires Elem::kColumnParam; };

// elem on the n lanes at column j of a row (x, t loaded by the caller), with its column
// parameter when it takes one: columns [j, j + n) of param (lanes past n are 0), or its one
// value. Shared by the loops of likelihood_kernel.h and row_ops_kernel.h, so that forward
// and the float16 recompute of backward see the same parameter.
template <typename Elem, typename A>
inline void run_elem(const Elem& elem, const Vec<A>& x, const Vec<A>& t, const ColumnParam& param, int64_t j,
                     int64_t n, Vec<A>& value, Vec<A>& grad) {
  if constexpr (TakesColumnParam<Elem>) {
    const A* p = static_cast<const A*>(param.data);
    elem(x, t, param.stride == 0 ? Vec<A>(p[0]) : load_as<A>(p + j, n), value, grad);
  } else {
    elem(x, t, value, grad);
  }
}

// Calls f(T{}) for the floating dtypes the ops accept.
template <typename F>
inline void dispatch_float(c10::ScalarType dt, F&& f) {
  switch (dt) {
    case c10::ScalarType::Float: return f(float{});
    case c10::ScalarType::Double: return f(double{});
    case c10::ScalarType::BFloat16: return f(c10::BFloat16{});
    case c10::ScalarType::Half: return f(c10::Half{});
    default: return;  // the host code checks dtypes before any kernel runs
  }
}

// As dispatch_float, plus the integer target dtypes bool and uint8.
template <typename F>
inline void dispatch_target(c10::ScalarType dt, F&& f) {
  switch (dt) {
    case c10::ScalarType::Bool: return f(bool{});
    case c10::ScalarType::Byte: return f(uint8_t{});
    default: return dispatch_float(dt, std::forward<F>(f));
  }
}

}  // namespace vaekern::cpu::CPU_CAPABILITY
