// gaussian_kl and gaussian_kl_backward on CUDA.
//
// Math (see kl.cuh): kl = 0.5*(m^2 + exp(min(l, 60)) - 1 - l) per element, (m, l) the
// latents standardized by the prior on load (m = mu, l = lv without one), summed per row,
// reduced over rows (reduce_partials.cuh). Backward (gaussian_kl_grads, kl.cu), with
// s = grad_out (grad_out / B for mean), without a prior:
//   grad_mu = s * mu,  grad_logvar = s * 0.5 * (exp(min(lv, 60)) - 1)
// (the straight-through clamp of vaekern.reference: no -0.5 plateau above lv = 60; 60 is
// kLogvarMax, conventions.h), and with one as kl.cuh's header states. Reduction 3 sums each
// latent element over the rows instead (gaussian_kl_columns, kl.cu: free bits), and its
// backward scales element j of every row by grad_out[j].
//
// Dtypes: mu and logvar float16, bfloat16, float32 or float64, the same for both;
// accumulated in float (double for double). The loss is float32, float64 for float64.
// Nothing is saved by forward beyond the inputs themselves.
// Limits: latents are small, so loads are scalar (coalesced across the group).
#include "kl.cuh"
#include "reduce_partials.cuh"
#include "row_scale.cuh"

namespace vaekern {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gaussian_kl_fwd_kernel(const scalar_t* __restrict__ mu,  // [B, D], rows mu_stride apart
                           const scalar_t* __restrict__ lv,  // [B, D], rows lv_stride apart
                           acc_t* __restrict__ partials,     // [B, tiles_per_row] per-tile sums
                           KlPrior prior, int64_t mu_stride, int64_t lv_stride, int64_t B, int64_t D, int64_t tile_len,
                           int64_t tiles_per_row, int G) {
  const GroupPos pos = group_pos(G);
  const int64_t ntiles = B * tiles_per_row;
  for (int64_t first = pos.first; first < ntiles; first += pos.stride) {
    const int64_t tile = first + pos.group;
    acc_t v = 0;
    if (tile < ntiles) {
      const int64_t b = tile / tiles_per_row;
      const int64_t start = (tile - b * tiles_per_row) * tile_len;
      v = kl_tile<scalar_t, acc_t>(mu + b * mu_stride, lv + b * lv_stride, prior, b, start, min(start + tile_len, D),
                                   pos.sub, G);
    }
    v = group_sum(v, G);
    if (pos.sub == 0 && tile < ntiles) partials[tile] = v;
  }
}

void check_kl_reduction(int64_t reduction) {
  if (reduction != kKlColumns) check_reduction(reduction);
}

}  // namespace

Tensor gaussian_kl_cuda(const Tensor& mu, const Tensor& logvar, const std::optional<Tensor>& prior_mu,
                        const std::optional<Tensor>& prior_logvar, int64_t reduction) {
  check_latents(mu, logvar, mu);
  check_kl_reduction(reduction);
  const KlPriorViews prior = kl_prior(prior_mu, prior_logvar, mu);
  const c10::cuda::CUDAGuard guard(mu.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Rows m = as_rows(mu);
  const Rows l = as_rows(logvar);
  const int64_t B = m.B, D = m.D;
  if (reduction == kKlColumns) {
    Tensor sums = at::empty(mu.sizes().slice(1), mu.options().dtype(acc_scalar(mu.scalar_type())));
    gaussian_kl_columns(m, l, mu.scalar_type(), prior.operand(), sums, stream);
    return sums;
  }
  Tensor out = at::empty(loss_shape(reduction, B),
                         mu.options().dtype(acc_scalar(mu.scalar_type())));
  if (B == 0 && reduction == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "gaussian_kl_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const int G = pow2_at_least(D, 32);
    const int64_t len = kl_tile_len(G);
    const int64_t tiles = std::max<int64_t>(1, ceil_div(D, len));
    const bool direct = reduction == 0 && tiles == 1;
    Tensor partials = direct ? out : at::empty({B * tiles}, out.options());
    if (B > 0) {
      gaussian_kl_fwd_kernel<scalar_t, acc_t><<<blocks_for(B * tiles * G), kThreads, 0, stream>>>(
          m.tensor.data_ptr<scalar_t>(), l.tensor.data_ptr<scalar_t>(), partials.data_ptr<acc_t>(), prior.operand(),
          m.row_stride,
          l.row_stride, B, D, len, tiles, G);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!direct) {
      reduce_partials<acc_t>(partials, tiles, Tensor(), 0, B, reduction, Tensor(), out, Tensor(), Tensor(), stream);
    }
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gaussian_kl_backward_cuda(const Tensor& grad_out, const Tensor& mu,
                                                                     const Tensor& logvar,
                                                                     const std::optional<Tensor>& prior_mu,
                                                                     const std::optional<Tensor>& prior_logvar,
                                                                     int64_t reduction) {
  check_latents(mu, logvar, mu);
  check_kl_reduction(reduction);
  const KlPriorViews prior = kl_prior(prior_mu, prior_logvar, mu);
  const c10::cuda::CUDAGuard guard(mu.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = mu.size(0);
  int64_t stride = 0;
  const bool per_column = reduction == kKlColumns;
  if (per_column) {  // one upstream per latent element, as a flat (D,) operand
    TORCH_CHECK(grad_out.sizes() == mu.sizes().slice(1), "vaekern (cuda): grad_out must have shape ",
                mu.sizes().slice(1), " (mu.shape[1:]) for the column reduction, got ", grad_out.sizes());
  }
  const Tensor go = per_column ? scale_operand(grad_out.reshape({-1}), mu, grad_out.numel(), "grad_out", &stride)
                               : scale_operand(grad_out, mu, B, "grad_out", &stride);
  const RowScale scale{.grad_loss = go.data_ptr(),
                       .grad_loss_stride = stride,
                       .grad_loss_kind = kind_of(go.scalar_type()),
                       .divisor = reduction == 1 ? static_cast<double>(B) : 1.0};
  return gaussian_kl_grads(mu, logvar, prior, scale, per_column, stream);
}

TORCH_LIBRARY_IMPL(vaekern, CUDA, m) {
  m.impl("gaussian_kl", &gaussian_kl_cuda);
  m.impl("gaussian_kl_backward", &gaussian_kl_backward_cuda);
}

}  // namespace cuda
}  // namespace vaekern
