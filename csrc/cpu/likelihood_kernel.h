// The vectorized loop of a likelihood term, shared by every likelihood (host code:
// likelihood.cpp). Adding a likelihood means writing one element functor,
//
//   struct Elem {
//     template <typename A>
//     void operator()(const Vec<A>& x, const Vec<A>& t, Vec<A>& value, Vec<A>& grad) const;
//   };
//
// which gives, lane by lane, the value of one element (its negative log-likelihood for the
// decoder output x and target t) and grad = d value / d x, in the arithmetic type A (float;
// double for double inputs, and for any input whose loss is float64: acc_dtype). likelihood_kernel<Elem> is then its entry in the Kernels table
// (kernel_table.h); the tiling, the row partials and the gradient stores are all here.
// The likelihoods: BernoulliNll<from_logits> (bernoulli_nll_kernel.h), GaussianNll
// (gaussian_nll_kernel.h) and ContinuousBernoulliNll<from_logits>
// (continuous_bernoulli_nll_kernel.h).
//
// A functor may take one per-column parameter (kColumnParam, kernel_utils.h): then
//
//     void operator()(const Vec<A>& x, const Vec<A>& t, const Vec<A>& p, Vec<A>& value, Vec<A>& grad) const;
//
// gets p = the parameter at the same columns as x (LikelihoodArgs::param: [cols] values in
// A, or one broadcast to every column), as the Gaussian's log_scale. Functors without one
// compile to exactly the loop they had before the parameter existed.
//
// Tasks are (row, chunk) pairs: each sums the values of kChunk columns of one row, in
// vectors of Vec<A>::size() lanes and then lane by lane (hsum), into its own double
// partial, and stores grad * grad_scale in the input's dtype. Lanes past the row's end are
// loaded as 0 and left out of the sum.
#pragma once

#include "cpu/kernel_utils.h"

namespace vaekern::cpu::CPU_CAPABILITY {

template <typename Elem, typename in_t, typename tgt_t, typename A>
void likelihood_tasks(const LikelihoodArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t W = Vec<A>::size();
  const Elem elem{};
  const Vec<A> zero(A(0)), scale(static_cast<A>(a.grad_scale));
  for (int64_t task = begin; task < end; ++task) {
    const int64_t row = task / a.chunks;
    const int64_t c0 = (task % a.chunks) * kChunk;
    const int64_t c1 = std::min(a.cols, c0 + kChunk);
    const int64_t off = row * a.cols;
    const in_t* x = static_cast<const in_t*>(a.input) + off;
    const tgt_t* t = static_cast<const tgt_t*>(a.target) + off;
    in_t* g = a.grad ? static_cast<in_t*>(a.grad) + off : nullptr;
    Vec<A> acc(A(0));
    for (int64_t j = c0; j < c1; j += W) {
      const int64_t n = std::min(W, c1 - j);
      Vec<A> value, grad;
      run_elem(elem, load_as<A>(x + j, n), load_as<A>(t + j, n), a.param, j, n, value, grad);
      acc += n == W ? value : Vec<A>::set(zero, value, n);
      if (g) store_as<A>(grad * scale, g + j, n);
    }
    a.partials[task] = hsum(acc);
  }
}

// The Kernels entry of likelihood Elem: the loop above for the input, target and
// arithmetic dtypes.
template <typename Elem>
void likelihood_kernel(const LikelihoodArgs& a, int64_t begin, int64_t end) {
  dispatch_float(a.input_dtype, [&](auto in) {
    using in_t = decltype(in);
    dispatch_target(a.target_dtype, [&](auto tgt) {
      dispatch_acc<in_t>(a.acc_dtype, [&](auto acc) {
        likelihood_tasks<Elem, in_t, decltype(tgt), decltype(acc)>(a, begin, end);
      });
    });
  });
}

}  // namespace vaekern::cpu::CPU_CAPABILITY
