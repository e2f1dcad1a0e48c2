// continuous_bernoulli_nll and continuous_bernoulli_nll_backward_ on CUDA.
//
// Math (the element functor ContinuousBernoulliNll, continuous_bernoulli_nll.cuh): per
// element the Bernoulli's nll(x, t) plus the negative log normalizer L(eta) of the logit
// eta (x itself, or from probabilities the logit of the clamped logs), and the derivative
// of both; per row the sum over D = numel / B elements; reduced over rows by `reduction`
// (0 none, 1 mean, 2 sum).
//
// Forward (likelihood_forward, likelihood.cuh): one pass over (input, target) writes
// per-tile partial sums and, when compute_grad, the gradient of the *reduced* loss for an
// upstream gradient of 1 (mean folds in 1/B), contiguous in input's dtype. Stage 2 sums
// the partials in a fixed order (reduce_partials.cuh). Nothing else is saved: backward
// only scales that gradient row by row.
//
// Backward (in place, scale_likelihood_rows_ of likelihood.cuh): row b of grad_input times
// grad_out[b] (or the scalar grad_out); rows whose factor is exactly 1 are not touched. A
// float16 element that overflowed or lost bits in forward is recomputed from input and
// target.
//
// Dtypes: input float16, bfloat16, float32, float64 (accumulated in float, double for
// double; the series threshold of L follows that math type); target any of those, bool or
// uint8, read in its own width. Losses are float32, float64 for float64 input.
// Limits: rows whose pointers are not 16-byte aligned (odd row lengths) use scalar loads.
#include "continuous_bernoulli_nll.cuh"
#include "likelihood.cuh"

namespace vaekern {
namespace cuda {

std::tuple<Tensor, Tensor> continuous_bernoulli_nll_cuda(const Tensor& input, const Tensor& target, bool from_logits,
                                                         int64_t reduction, bool compute_grad) {
  check_cuda(input, "input", input);
  check_cuda(target, "target", input);
  check_float(input, "input");
  kind_of(target.scalar_type());
  TORCH_CHECK(input.sizes() == target.sizes(), "vaekern (cuda): target has shape ", target.sizes(),
              " but input has shape ", input.sizes());
  check_reduction(reduction);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const Rows x = as_rows(input);
  const Rows t = as_rows(target);
  const auto acc = acc_scalar(input.scalar_type());
  Tensor out = at::empty(loss_shape(reduction, x.B), input.options().dtype(acc));
  Tensor grad = compute_grad ? at::empty(input.sizes(), input.options()) : at::empty({0}, input.options());
  if (x.B == 0 && reduction == 0) return {out, grad};

  if (from_logits) {
    likelihood_forward<ContinuousBernoulliNll<true>>(x, t, target.scalar_type(), reduction, compute_grad, grad, out,
                                                     stream);
  } else {
    likelihood_forward<ContinuousBernoulliNll<false>>(x, t, target.scalar_type(), reduction, compute_grad, grad, out,
                                                      stream);
  }
  return {out, grad};
}

void continuous_bernoulli_nll_backward_cuda(const Tensor& grad_input, const Tensor& grad_out, const Tensor& input,
                                            const Tensor& target, bool from_logits, int64_t reduction) {
  check_cuda(grad_input, "grad_input", grad_input);
  check_float(grad_input, "grad_input");
  TORCH_CHECK(grad_input.dim() >= 1, "vaekern (cuda): grad_input must have a batch dim");
  check_reduction(reduction);
  const c10::cuda::CUDAGuard guard(grad_input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = grad_input.size(0);
  int64_t stride = 0;
  const Tensor go = scale_operand(grad_out, grad_input, B, "grad_out", &stride);
  const RowScale scale{
      .grad_loss = go.data_ptr(), .grad_loss_stride = stride, .grad_loss_kind = kind_of(go.scalar_type())};
  const double grad_scale = reduction == 1 ? 1.0 / static_cast<double>(B) : 1.0;
  if (from_logits) {
    scale_likelihood_rows_<ContinuousBernoulliNll<true>>(grad_input, scale, input, target, grad_scale, stream);
  } else {
    scale_likelihood_rows_<ContinuousBernoulliNll<false>>(grad_input, scale, input, target, grad_scale, stream);
  }
}

TORCH_LIBRARY_IMPL(vaekern, CUDA, m) {
  m.impl("continuous_bernoulli_nll", &continuous_bernoulli_nll_cuda);
  m.impl("continuous_bernoulli_nll_backward_", &continuous_bernoulli_nll_backward_cuda);
}

}  // namespace cuda
}  // namespace vaekern
