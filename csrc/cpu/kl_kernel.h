// Vectorized loops of the Gaussian KL term (host code: kl.cpp; the op: gaussian_kl.cpp).
// The prior N(pm, exp(plv)) is taken to N(0, I) on load (standardize): the KL is that of
//   m = (mu - pm) * e,  l = lv - plv,  e = exp(-plv / 2)    (m = mu, l = lv without a prior)
//   kl      = 0.5 * (m^2 + exp(min(l, 60)) - 1 - l)
//   g_m     = s * m,   g_l = s * 0.5 * (exp(min(l, 60)) - 1)   (straight-through clamp)
//   d/dmu   = g_m * e, d/dlv = g_l, d/dpm = -d/dmu, d/dplv = -g_l - 0.5 * g_m * m
// 60 is kLogvarMax (conventions.h). Forward computes in acc_dtype (float or double, as the
// caller says; with wide_sums, m^2 and the sums in double); the KL_COLUMNS reduction sums
// each column over the rows instead (gaussian_kl_columns_tasks), and its backward scales
// per column. Backward forms m, l, e and
// d kl / d l in float (double for double latents) and the products with the row's scale in
// double, each output rounded once to its dtype. The prior is read at its broadcast
// strides, in the latents' arithmetic type (P = acc_t<T>).
// exp(x) - 1 is evaluated as expm1(x): near l = 0, where a trained encoder's logvar
// sits, exp(l) - 1 would lose the low bits of the gradient to cancellation.
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

// Columns [j, j + n) of row `row` of a prior part, as A (lanes past n unspecified: the
// callers mask or do not store them). P is the part's type.
template <typename A, typename P>
inline Vec<A> load_prior(const PriorOperand& p, int64_t row, int64_t j, int64_t n) {
  const P* base = static_cast<const P*>(p.data) + row * p.row_stride + j * p.col_stride;
  if (p.col_stride == 1) return load_as<A>(base, n);
  if (p.col_stride == 0) return Vec<A>(static_cast<A>(*base));
  alignas(64) A buf[Vec<A>::size()] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(base[i * p.col_stride]);
  return Vec<A>::loadu(buf);
}

// (m, l, e) of the header from mu and lv in place, e = 1 without a prior log-variance.
template <typename A, typename P>
inline void standardize(const GaussianKlArgs& a, int64_t row, int64_t j, int64_t n, Vec<A>& m, Vec<A>& lv,
                        Vec<A>& e) {
  if (a.prior_mu.data != nullptr) m = m - load_prior<A, P>(a.prior_mu, row, j, n);
  if (a.prior_logvar.data != nullptr) {
    const Vec<A> plv = load_prior<A, P>(a.prior_logvar, row, j, n);
    e = vexp(Vec<A>(static_cast<A>(-0.5)) * plv);
    m = m * e;
    lv = lv - plv;
  }
}

// kWide (float math only): m^2 and the sums in double. The rest of an element,
// exp(min(l, 60)) - 1 - l, is finite in float for every finite l (at most 1.2e26 or
// -l), so only these can leave float's range; vae_loss's why is in vae_loss.cpp.
template <typename T, typename A, bool kWide>
void gaussian_kl_tasks(const GaussianKlArgs& a, int64_t begin, int64_t end) {
  using P = acc_t<T>;
  constexpr int64_t W = Vec<A>::size();
  const Vec<A> zero(A(0)), half(A(0.5));
  for (int64_t row = begin; row < end; ++row) {
    const T* m = static_cast<const T*>(a.mu) + row * a.cols;
    const T* lv = static_cast<const T*>(a.logvar) + row * a.cols;
    Vec<A> acc(A(0));
    Vec<double> wide_acc(0.0);  // twice the KL (kWide)
    for (int64_t j = 0; j < a.cols; j += W) {
      const int64_t n = std::min(W, a.cols - j);
      Vec<A> mv = load_as<A>(m + j, n), lvv = load_as<A>(lv + j, n), e(A(1));
      standardize<A, P>(a, row, j, n, mv, lvv, e);
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

// The outputs of `cnt` lanes at offset `at` of a row from m, d kl / d l (dl) and e in
// double: each product with the row's scale s in double, rounded once to its output type.
template <typename T, typename P>
inline void store_kl_grads(const GaussianKlArgs& a, int64_t at, int64_t cnt, const Vec<double>& s,
                           const Vec<double>& m, const Vec<double>& dl, const Vec<double>& e) {
  const Vec<double> g_m = s * m, g_l = s * dl;
  const Vec<double> g_mu = a.prior_logvar.data != nullptr ? g_m * e : g_m;
  store_as<double>(g_mu, static_cast<T*>(a.grad_mu) + at, cnt);
  store_as<double>(g_l, static_cast<T*>(a.grad_logvar) + at, cnt);
  if (a.grad_prior_mu != nullptr) store_as<double>(Vec<double>(0.0) - g_mu, static_cast<P*>(a.grad_prior_mu) + at, cnt);
  if (a.grad_prior_logvar != nullptr) {
    store_as<double>(Vec<double>(0.0) - g_l - Vec<double>(0.5) * g_m * m, static_cast<P*>(a.grad_prior_logvar) + at,
                     cnt);
  }
}

// KL_COLUMNS: the KL of each of columns [begin, end) summed over every row, each lane's rows
// added in order (deterministic whatever the split into tasks).
template <typename T>
void gaussian_kl_columns_tasks(const GaussianKlArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  constexpr int64_t W = Vec<A>::size();
  const Vec<A> zero(A(0)), half(A(0.5));
  for (int64_t j = begin; j < end; j += W) {
    const int64_t n = std::min(W, end - j);
    Vec<A> acc(A(0));
    for (int64_t row = 0; row < a.rows; ++row) {
      Vec<A> mv = load_as<A>(static_cast<const T*>(a.mu) + row * a.cols + j, n);
      Vec<A> lvv = load_as<A>(static_cast<const T*>(a.logvar) + row * a.cols + j, n), e(A(1));
      standardize<A, A>(a, row, j, n, mv, lvv, e);
      acc += half * (mv * mv + (clamped_var_m1(lvv) - lvv));
    }
    alignas(64) A sums[W];
    (n == W ? acc : Vec<A>::set(zero, acc, n)).store(sums);
    for (int64_t i = 0; i < n; ++i) a.out[j + i] = static_cast<double>(sums[i]);
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
    // The scale is a double (a float64 loss's upstream times beta may be beyond float's
    // range, or below its normals): the products in double. One per row, or per column.
    const Vec<double> s_row(a.per_column ? 0.0 : a.scale[row]);
    const auto scale = [&](int64_t at, int64_t cnt) {
      return a.per_column ? Vec<double>::loadu(a.scale + at, cnt) : s_row;
    };
    for (int64_t j = 0; j < a.cols; j += W) {
      const int64_t n = std::min(W, a.cols - j);
      Vec<A> mv = load_as<A>(m + j, n), lvv = load_as<A>(lv + j, n), e(A(1));
      standardize<A, A>(a, row, j, n, mv, lvv, e);
      const Vec<A> dlv = half * clamped_var_m1(lvv);
      if constexpr (std::is_same_v<A, double>) {
        store_kl_grads<T, A>(a, off + j, n, scale(j, n), mv, dlv, e);
      } else {
        constexpr int64_t H = Vec<double>::size();
        const auto [m0, m1] = widen(mv);
        const auto [g0, g1] = widen(dlv);
        const auto [e0, e1] = widen(e);
        store_kl_grads<T, A>(a, off + j, std::min(H, n), scale(j, std::min(H, n)), m0, g0, e0);
        if (n > H) store_kl_grads<T, A>(a, off + j + H, n - H, scale(j + H, n - H), m1, g1, e1);
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

inline void gaussian_kl_columns_kernel(const GaussianKlArgs& a, int64_t begin, int64_t end) {
  dispatch_float(a.dtype, [&](auto v) { gaussian_kl_columns_tasks<decltype(v)>(a, begin, end); });
}

inline void gaussian_kl_backward_kernel(const GaussianKlArgs& a, int64_t begin, int64_t end) {
  dispatch_float(a.dtype, [&](auto v) { gaussian_kl_backward_tasks<decltype(v)>(a, begin, end); });
}

}  // namespace vaekern::cpu::CPU_CAPABILITY
