// Vectorized loops of reparameterize (host code and math: reparameterize.cpp).
//   z = mu + exp(lv / 2) * eps,   d/dlv = grad_z * 0.5 * exp(lv / 2) * eps
// In-op noise: element i of the flattened latents takes its normal from Philox-4x32-10
// keyed on the seed, counter i / 4 (one block gives 4 uint32, i.e. two Box-Muller pairs).
// It depends on (seed, i) only, so neither the thread count nor the task split matters,
// and backward regenerates exactly the forward's noise. The noise is float32 (widened for
// float64 latents); uniforms of 32 bits bound |eps| below 6.8.
#pragma once

#include <ATen/core/PhiloxRNGEngine.h>

#include <cmath>

#include "cpu/kernel_utils.h"
#include "cpu/vec_math.h"

namespace vaekern::cpu::CPU_CAPABILITY {

// Writes the normals of elements [start, start + count) to out; start % 4 == 0 and
// count <= kNoiseBlock.
inline void philox_normals(uint64_t seed, int64_t start, int64_t count, float* out) {
  constexpr int64_t kPairs = kNoiseBlock / 2;
  constexpr int64_t W = Vec<float>::size();
  static_assert(kPairs % W == 0, "kNoiseBlock must hold whole vectors of pairs");
  alignas(64) float u1[kPairs], u2[kPairs];
  const int64_t pairs = (count + 1) / 2;
  at::Philox4_32 engine(seed, /*subsequence=*/0, /*offset=*/static_cast<uint64_t>(start / 4));
  for (int64_t k = 0; k < pairs; ++k) {
    // u1 in (0, 1], so log(u1) is finite; u2 in [0, 1].
    u1[k] = static_cast<float>(engine()) * 0x1p-32f + 0x1p-33f;
    u2[k] = static_cast<float>(engine()) * 0x1p-32f;
  }
  // Pad the last vector with fixed values: Sleef's vector sin/cos take a slower, more
  // exact path for all lanes when any lane is large, so stale stack values in unused
  // lanes would change the used ones.
  const int64_t padded = (pairs + W - 1) / W * W;
  for (int64_t k = pairs; k < padded; ++k) {
    u1[k] = 1.0f;
    u2[k] = 0.0f;
  }
  const Vec<float> minus_two(-2.0f), two_pi(static_cast<float>(2.0 * M_PI));
  for (int64_t k = 0; k < padded; k += W) {
    const Vec<float> r = (minus_two * vlog(Vec<float>::loadu(u1 + k))).sqrt();
    const Vec<float> theta = two_pi * Vec<float>::loadu(u2 + k);
    (r * theta.cos()).store(u1 + k);
    (r * theta.sin()).store(u2 + k);
  }
  for (int64_t i = 0; i < count; ++i) out[i] = (i & 1) ? u2[i >> 1] : u1[i >> 1];
}

// The noise of one block as acc type A: eps itself, or Philox normals.
template <typename T, typename A>
inline const A* block_noise(const ReparameterizeArgs& a, int64_t start, int64_t count, A* buf, float* fbuf) {
  if (a.eps == nullptr) {
    philox_normals(a.seed, start, count, fbuf);
    if constexpr (std::is_same_v<A, float>) {
      return fbuf;
    } else {
      for (int64_t i = 0; i < count; ++i) buf[i] = fbuf[i];
      return buf;
    }
  }
  const T* eps = static_cast<const T*>(a.eps) + start;
  for (int64_t i = 0; i < count; ++i) buf[i] = static_cast<A>(eps[i]);
  return buf;
}

template <typename T>
void reparameterize_tasks(const ReparameterizeArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  constexpr int64_t W = Vec<A>::size();
  alignas(64) A buf[kNoiseBlock];
  alignas(64) float fbuf[kNoiseBlock];
  const Vec<A> half(A(0.5));
  for (int64_t block = begin; block < end; ++block) {
    const int64_t start = block * kNoiseBlock;
    const int64_t count = std::min(kNoiseBlock, a.n - start);
    const A* eps = block_noise<T, A>(a, start, count, buf, fbuf);
    const T* mu = static_cast<const T*>(a.mu) + start;
    const T* lv = static_cast<const T*>(a.logvar) + start;
    T* z = static_cast<T*>(a.z) + start;
    for (int64_t j = 0; j < count; j += W) {
      const int64_t n = std::min(W, count - j);
      const Vec<A> std = vexp(half * load_as<A>(lv + j, n));
      store_as<A>(load_as<A>(mu + j, n) + std * load_as<A>(eps + j, n), z + j, n);
    }
  }
}

template <typename T>
void reparameterize_backward_tasks(const ReparameterizeArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  constexpr int64_t W = Vec<A>::size();
  alignas(64) A buf[kNoiseBlock];
  alignas(64) float fbuf[kNoiseBlock];
  const Vec<A> half(A(0.5));
  for (int64_t block = begin; block < end; ++block) {
    const int64_t start = block * kNoiseBlock;
    const int64_t count = std::min(kNoiseBlock, a.n - start);
    const A* eps = block_noise<T, A>(a, start, count, buf, fbuf);
    const T* gz = static_cast<const T*>(a.grad_z) + start;
    const T* lv = static_cast<const T*>(a.logvar) + start;
    T* glv = static_cast<T*>(a.grad_logvar) + start;
    for (int64_t j = 0; j < count; j += W) {
      const int64_t n = std::min(W, count - j);
      const Vec<A> std = vexp(half * load_as<A>(lv + j, n));
      store_as<A>(load_as<A>(gz + j, n) * half * std * load_as<A>(eps + j, n), glv + j, n);
    }
  }
}

inline void reparameterize_kernel(const ReparameterizeArgs& a, int64_t begin, int64_t end) {
  dispatch_float(a.dtype, [&](auto v) { reparameterize_tasks<decltype(v)>(a, begin, end); });
}

inline void reparameterize_backward_kernel(const ReparameterizeArgs& a, int64_t begin, int64_t end) {
  dispatch_float(a.dtype, [&](auto v) { reparameterize_backward_tasks<decltype(v)>(a, begin, end); });
}

}  // namespace vaekern::cpu::CPU_CAPABILITY
