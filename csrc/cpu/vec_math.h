// float32 exp, expm1 and log as inline at::vec code, for the kernels of this directory.
//
// Why: on the AMD EPYC (Zen 4) VM where these kernels were tuned, with torch 2.14.1, the
// Sleef routines behind Vectorized<float>::log/log1p/expm1 cost 10-15 ns per element at
// the AVX512 capability (torch.log1p(x, out=y) over 262k floats, one thread: 14.6 ns; the
// AVX2 build: 1.5 ns), while Vectorized<float>::exp costs 0.6 ns. These are the Cephes
// single-precision algorithms (range reduction by powers of two, a short polynomial),
// within 1 ulp in float, written with Vectorized arithmetic so every capability gets them.
// float64 uses Sleef (Vectorized<double>).
// NaN propagates through all of them.
#pragma once

#include <limits>

#include "cpu/kernel_utils.h"

namespace vaekern::cpu::CPU_CAPABILITY {

// 2^n for integral n in [-126, 127], built in the exponent field.
inline Vec<float> pow2i(const Vec<float>& n) {
  const auto bits = (at::vec::convert_to_int_of_same_size(n) + Vec<int32_t>(127)) << Vec<int32_t>(23);
  return at::vec::cast<float>(bits);
}

// exp on [-87.3, 88.7] by e^x = 2^n e^r, |r| <= ln2/2; x is clamped to that range first.
inline Vec<float> exp_core(const Vec<float>& x) {
  using V = Vec<float>;
  const V n = at::vec::fmadd(x, V(1.44269504088896341f), V(0.5f)).floor();
  V r = at::vec::fmadd(n, V(-0.693359375f), x);
  r = at::vec::fmadd(n, V(2.12194440e-4f), r);
  V p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, V(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, V(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, V(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, V(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, V(5.0000001201e-1f));
  const V y = at::vec::fmadd(p, r * r, r) + V(1.0f);
  // n reaches 128 just below the overflow threshold: scale by 2^127 * 2 there.
  const V top(127.0f);
  return y * pow2i(at::vec::minimum(n, top)) * V::blendv(V(1.0f), V(2.0f), n > top);
}

// exp(x); 0 below -87.3 (where the true value is subnormal), inf above 88.72.
template <typename A>
inline Vec<A> vexp(const Vec<A>& x) {
  if constexpr (std::is_same_v<A, double>) {
    return x.exp();
  } else {
    using V = Vec<float>;
    const V lo(-87.3f), hi(88.72f);
    const V y = exp_core(at::vec::minimum(at::vec::maximum(x, lo), hi));
    return V::blendv(V::blendv(y, V(0.0f), x < lo), V(std::numeric_limits<float>::infinity()), x > hi);
  }
}

// exp(x) for x <= 0 only: vexp without the overflow branch (the logits path).
template <typename A>
inline Vec<A> exp_nonpositive(const Vec<A>& x) {
  if constexpr (std::is_same_v<A, double>) {
    return x.exp();
  } else {
    using V = Vec<float>;
    const V lo(-87.3f);
    return V::blendv(exp_core(at::vec::maximum(x, lo)), V(0.0f), x < lo);
  }
}

// exp(x) - 1 without cancellation: a Taylor polynomial for |x| < 1/2 (terms to x^9,
// truncation below 1e-9 relative), exp(x) - 1 elsewhere (|result| >= 0.39: no cancellation).
template <typename A>
inline Vec<A> vexpm1(const Vec<A>& x) {
  if constexpr (std::is_same_v<A, double>) {
    return x.expm1();
  } else {
    using V = Vec<float>;
    V p(1.0f / 362880.0f);
    p = at::vec::fmadd(p, x, V(1.0f / 40320.0f));
    p = at::vec::fmadd(p, x, V(1.0f / 5040.0f));
    p = at::vec::fmadd(p, x, V(1.0f / 720.0f));
    p = at::vec::fmadd(p, x, V(1.0f / 120.0f));
    p = at::vec::fmadd(p, x, V(1.0f / 24.0f));
    p = at::vec::fmadd(p, x, V(1.0f / 6.0f));
    p = at::vec::fmadd(p, x, V(0.5f));
    const V small = at::vec::fmadd(p * x, x, x);
    return V::blendv(vexp(x) - V(1.0f), small, x.abs() < V(0.5f));
  }
}

// log(m) + k*ln2 for m in [sqrt(1/2), sqrt(2)] and integral k.
inline Vec<float> log_core(const Vec<float>& m, const Vec<float>& k) {
  using V = Vec<float>;
  const V f = m - V(1.0f);  // exact (Sterbenz)
  const V z = f * f;
  V p(7.0376836292e-2f);
  p = at::vec::fmadd(p, f, V(-1.1514610310e-1f));
  p = at::vec::fmadd(p, f, V(1.1676998740e-1f));
  p = at::vec::fmadd(p, f, V(-1.2420140846e-1f));
  p = at::vec::fmadd(p, f, V(1.4249322787e-1f));
  p = at::vec::fmadd(p, f, V(-1.6668057665e-1f));
  p = at::vec::fmadd(p, f, V(2.0000714765e-1f));
  p = at::vec::fmadd(p, f, V(-2.4999993993e-1f));
  p = at::vec::fmadd(p, f, V(3.3333331174e-1f));
  V y = f * z * p;
  y = at::vec::fmadd(k, V(-2.12194440e-4f), y);
  y = at::vec::fmadd(z, V(-0.5f), y);
  return at::vec::fmadd(k, V(0.693359375f), f + y);
}

// log(u) for u in [1, 2] only (the logits path: u = 1 + exp(-|l|)).
template <typename A>
inline Vec<A> log_1_to_2(const Vec<A>& u) {
  if constexpr (std::is_same_v<A, double>) {
    return u.log();
  } else {
    using V = Vec<float>;
    const V big = u > V(1.41421356f);
    return log_core(V::blendv(u, u * V(0.5f), big), V::blendv(V(0.0f), V(1.0f), big));
  }
}

// log(x) for any float: -inf at 0, NaN below, inf at inf; subnormals are scaled first.
template <typename A>
inline Vec<A> vlog(const Vec<A>& x) {
  if constexpr (std::is_same_v<A, double>) {
    return x.log();
  } else {
    using V = Vec<float>;
    using I = Vec<int32_t>;
    const V tiny = x < V(1.17549435e-38f);
    const V xs = V::blendv(x, x * V(16777216.0f), tiny);  // 2^24
    const I bits = at::vec::cast<int32_t>(xs);
    V e = at::vec::convert_to_fp_of_same_size<float>((bits >> I(23)) - I(127));
    V m = at::vec::cast<float>((bits & I(0x007fffff)) | I(0x3f800000));  // [1, 2)
    const V big = m > V(1.41421356f);
    m = V::blendv(m, m * V(0.5f), big);
    e = e + V::blendv(V(0.0f), V(1.0f), big) - V::blendv(V(0.0f), V(24.0f), tiny);
    V y = log_core(m, e);
    y = V::blendv(y, V(-std::numeric_limits<float>::infinity()), x == V(0.0f));
    y = V::blendv(y, V(std::numeric_limits<float>::quiet_NaN()), x < V(0.0f));
    y = V::blendv(y, x, x == V(std::numeric_limits<float>::infinity()));
    return V::blendv(y, x, x != x);  // NaN in, NaN out
  }
}

}  // namespace vaekern::cpu::CPU_CAPABILITY
