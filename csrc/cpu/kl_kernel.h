// Vectorized loops of the Gaussian KL term (host code: kl.cpp; the op: gaussian_kl.cpp).
// Forward computes in acc_dtype (float or double, as the caller says; with wide_sums,
// mu^2 and the sums in double); backward forms d kl / d latent in float (double for double
// latents) and its product with the row's scale in double, rounded once to the latents'
// dtype.
//   kl      = 0.5 * (mu^2 + exp(min(lv, 60)) - 1 - lv)
//   d/dmu   = s * mu,   d/dlv = s * 0.5 * (exp(min(lv, 60)) - 1)   (straight-through clamp)
// 60 is kLogvarMax (conventions.h).
// exp(x) - 1 is evaluated as expm1(x): near lv = 0, where a trained encoder's logvar
// sits, exp(lv) - 1 would lose the low bits of the gradient to cancellation.
// at::vec::minimum propagates NaN, so a NaN logvar gives NaN.
#pragma once

#include "cpu/kernel_utils.h"
#include "cpu/vec_math.h"
#include "conventions.h"

namespace vaekern::cpu::CPU_CAPABILITY {

// exp(min(lv, kLogvarMax)) - 1
template <typename A>
inline Vec<A> clamped_var_m1(const Vec<A>& lv) {
  return vexpm1(at::vec::minimum(lv, Vec<A>(static_cast<A>(kLogvarMax))));
}

// kWide (float math only): mu^2 and the sums in double. The rest of an element,
// exp(min(lv, 60)) - 1 - lv, is finite in float for every finite lv (at most 1.2e26 or
// -lv), so only these can leave float's range; vae_loss's why is in vae_loss.cpp.
template <typename T, typename A, bool kWide>
void gaussian_kl_tasks(const GaussianKlArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t W = Vec<A>::size();
  const Vec<A> zero(A(0)), half(A(0.5));
  for (int64_t row = begin; row < end; ++row) {
    const T* m = static_cast<const T*>(a.mu) + row * a.cols;
    const T* lv = static_cast<const T*>(a.logvar) + row * a.cols;
    Vec<A> acc(A(0));
    Vec<double> wide_acc(0.0);  // twice the KL (kWide)
    for (int64_t j = 0; j < a.cols; j += W) {
      const int64_t n = std::min(W, a.cols - j);
      const Vec<A> mv = load_as<A>(m + j, n), lvv = load_as<A>(lv + j, n);
      if constexpr (kWide) {
        const Vec<A> var = clamped_var_m1(lvv) - lvv;
        const auto [m0, m1] = widen(n == W ? mv : Vec<A>::set(zero, mv, n));
        const auto [v0, v1] = widen(n == W ? var : Vec<A>::set(zero, var, n));
        wide_acc += m0 * m0 + v0;
        wide_acc += m1 * m1 + v1;
      } else {
        const Vec<A> kl = half * (mv * mv + (clamped_var_m1(lvv) - lvv));
        acc += n == W ? kl : Vec<A>::set(zero, kl, n);
      }
    }
    a.out[row] = kWide ? 0.5 * hsum(wide_acc) : hsum(acc);
  }
}

template <typename T>
void gaussian_kl_backward_tasks(const GaussianKlArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  constexpr int64_t W = Vec<A>::size();
  const Vec<A> half(A(0.5));
  for (int64_t row = begin; row < end; ++row) {
    const int64_t off = row * a.cols;
    const T* m = static_cast<const T*>(a.mu) + off;
    const T* lv = static_cast<const T*>(a.logvar) + off;
    T* gm = static_cast<T*>(a.grad_mu) + off;
    T* glv = static_cast<T*>(a.grad_logvar) + off;
    const Vec<double> s(a.scale[row]);
    for (int64_t j = 0; j < a.cols; j += W) {
      const int64_t n = std::min(W, a.cols - j);
      const Vec<A> mv = load_as<A>(m + j, n), dlv = half * clamped_var_m1(load_as<A>(lv + j, n));
      if constexpr (std::is_same_v<A, double>) {
        store_as<A>(s * mv, gm + j, n);
        store_as<A>(s * dlv, glv + j, n);
      } else {
        // The scale is a double (a float64 loss's upstream times beta may be beyond float's
        // range, or below its normals): each product in double, rounded once to T.
        constexpr int64_t H = Vec<double>::size();
        const auto [m0, m1] = widen(mv);
        const auto [g0, g1] = widen(dlv);
        store_as<double>(s * m0, gm + j, std::min(H, n));
        store_as<double>(s * g0, glv + j, std::min(H, n));
        if (n > H) {
          store_as<double>(s * m1, gm + j + H, n - H);
          store_as<double>(s * g1, glv + j + H, n - H);
        }
      }
    }
  }
}

inline void gaussian_kl_kernel(const GaussianKlArgs& a, int64_t begin, int64_t end) {
  dispatch_float(a.dtype, [&](auto v) {
    using T = decltype(v);
    dispatch_acc<T>(a.acc_dtype, [&](auto acc) {
      using A = decltype(acc);
      if constexpr (std::is_same_v<A, float>) {
        if (a.wide_sums) return gaussian_kl_tasks<T, A, true>(a, begin, end);
      }
      gaussian_kl_tasks<T, A, false>(a, begin, end);
    });
  });
}

inline void gaussian_kl_backward_kernel(const GaussianKlArgs& a, int64_t begin, int64_t end) {
  dispatch_float(a.dtype, [&](auto v) { gaussian_kl_backward_tasks<decltype(v)>(a, begin, end); });
}

}  // namespace vaekern::cpu::CPU_CAPABILITY
