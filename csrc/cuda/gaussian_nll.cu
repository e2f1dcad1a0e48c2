// gaussian_nll and gaussian_nll_backward_ on CUDA.
//
// Math (the element functor GaussianNll, gaussian_nll.cuh): per element, with
// s = log_scale[d] for column d of the flattened row,
//   nll = 0.5 * (x - t)^2 * exp(-2 s) + s + 0.5 * log(2 pi),  d nll / dx = (x - t) * exp(-2 s);
// per row the sum over D = numel / B elements; reduced over rows by `reduction` (0 none,
// 1 mean, 2 sum). log_scale is () (one scale for every element) or (D,) (the op layer
// broadcasts the user's log_scale to input.shape[1:] and flattens it), in the accumulation
// dtype; its gradient is the op layer's, not a kernel output.
//
// Forward (likelihood_forward, likelihood.cuh): one pass over (input, target), log_scale
// read per column (it stays in cache: D values shared by all rows), writes per-tile partial
// sums and, when compute_grad, the gradient of the *reduced* loss for an upstream gradient
// of 1 (mean folds in 1/B), contiguous in input's dtype. Stage 2 sums the partials in a
// fixed order (reduce_partials.cuh). Nothing else is saved: backward only scales that
// gradient row by row.
//
// Backward (in place, scale_likelihood_rows_ of likelihood.cuh): row b of grad_input times
// grad_out[b] (or the scalar grad_out); rows whose factor is exactly 1 are not touched. A
// float16 element that overflowed or lost bits in forward (a small sigma overflows float16
// quickly) is recomputed from input, target and log_scale.
//
// Dtypes: input float16, bfloat16, float32, float64 (accumulated in float, double for
// double); target any of those, bool or uint8, read in its own width; log_scale float32,
// float64 for float64 input. Losses are float32, float64 for float64 input.
// Limits: no clamp (exp(-2 s) overflows for s < -44 in float); rows whose pointers are not
// 16-byte aligned use scalar loads.
#include "gaussian_nll.cuh"
#include "likelihood.cuh"

namespace vaekern {
namespace cuda {
namespace {

int64_t row_length(const Tensor& x) {
  int64_t D = 1;
  for (int64_t d = 1; d < x.dim(); ++d) D *= x.size(d);
  return D;
}

}  // namespace

std::tuple<Tensor, Tensor> gaussian_nll_cuda(const Tensor& input, const Tensor& target, const Tensor& log_scale,
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
  check_log_scale(log_scale, input, input.scalar_type(), x.D);
  const auto acc = acc_scalar(input.scalar_type());
  Tensor out = at::empty(loss_shape(reduction, x.B), input.options().dtype(acc));
  Tensor grad = compute_grad ? at::empty(input.sizes(), input.options()) : at::empty({0}, input.options());
  if (x.B == 0 && reduction == 0) return {out, grad};

  likelihood_forward<GaussianNll>(x, t, target.scalar_type(), reduction, compute_grad, grad, out, stream, log_scale);
  return {out, grad};
}

void gaussian_nll_backward_cuda(const Tensor& grad_input, const Tensor& grad_out, const Tensor& input,
                                const Tensor& target, const Tensor& log_scale, int64_t reduction) {
  check_cuda(grad_input, "grad_input", grad_input);
  check_float(grad_input, "grad_input");
  TORCH_CHECK(grad_input.dim() >= 1, "vaekern (cuda): grad_input must have a batch dim");
  check_reduction(reduction);
  check_log_scale(log_scale, grad_input, grad_input.scalar_type(), row_length(grad_input));
  const c10::cuda::CUDAGuard guard(grad_input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = grad_input.size(0);
  int64_t stride = 0;
  const Tensor go = scale_operand(grad_out, grad_input, B, "grad_out", &stride);
  const RowScale scale{
      .grad_loss = go.data_ptr(), .grad_loss_stride = stride, .grad_loss_kind = kind_of(go.scalar_type())};
  const double grad_scale = reduction == 1 ? 1.0 / static_cast<double>(B) : 1.0;
  scale_likelihood_rows_<GaussianNll>(grad_input, scale, input, target, grad_scale, stream, log_scale);
}

TORCH_LIBRARY_IMPL(vaekern, CUDA, m) {
  m.impl("gaussian_nll", &gaussian_nll_cuda);
  m.impl("gaussian_nll_backward_", &gaussian_nll_backward_cuda);
}

}  // namespace cuda
}  // namespace vaekern
