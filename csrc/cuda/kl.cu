// gaussian_kl_columns, gaussian_kl_grads and kl_prior (kl.cuh): the KL of each latent column
// summed over the rows (the KL_COLUMNS reduction: gaussian_kl's, and vae_loss's free bits),
// and the latent and prior gradients of the KL term
// for per-row scales s_b (or per-column ones s_j), with m, l, e the latents standardized by the prior (kl.cuh),
//   grad_mu = s_b * m * e,  grad_logvar = s_b * 0.5 * (exp(min(l, 60)) - 1),
//   grad_prior_mu = -grad_mu,  grad_prior_logvar = -grad_logvar - 0.5 * s_b * m^2
// recomputed from mu, logvar and the prior (latent-sized, cheap) by gaussian_kl_backward and
// vae_loss_backward_.
//
// Dtypes: mu and logvar float16, bfloat16, float32 or float64, the same for both; the
// prior in their arithmetic type; the derivatives computed in float (double for double),
// their products with s in double, stored in mu's dtype (the prior's for its gradients).
// Limits: one thread per element, scalar loads (latents are small); non-contiguous latents
// are copied to contiguous first. A prior is read in place at its broadcast strides, or
// copied where no [B, D] view of it exists.
#include <ATen/ExpandUtils.h>

#include "kl.cuh"

namespace vaekern {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    gaussian_kl_grads_kernel(const scalar_t* __restrict__ mu,                // [B, D] contiguous
                             const scalar_t* __restrict__ lv,                // [B, D] contiguous
                             scalar_t* __restrict__ grad_mu,                 // [B, D] contiguous
                             scalar_t* __restrict__ grad_lv,                 // [B, D] contiguous
                             acc_type<scalar_t>* __restrict__ grad_prior_mu, // [B, D] or nullptr
                             acc_type<scalar_t>* __restrict__ grad_prior_lv, // [B, D] or nullptr
                             KlPrior prior, RowScale scale, bool per_column, int64_t n, int64_t D) {
  using acc_t = acc_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t b = i / D;
    acc_t m = to_acc<scalar_t, acc_t>(mu[i]), l = to_acc<scalar_t, acc_t>(lv[i]), e = 1;
    PriorRow<acc_t>(prior, b).standardize(i - b * D, m, l, e);
    // The scale stays double (a float64 loss's upstream times beta may be beyond float's
    // range, or below its normals): each product in double, rounded once to its output.
    const double s = scale(per_column ? i - b * D : b);
    const double g_m = s * static_cast<double>(m), g_l = s * static_cast<double>(kl_grad_lv(l));
    const double g_mu = prior.lv != nullptr ? g_m * static_cast<double>(e) : g_m;
    grad_mu[i] = static_cast<scalar_t>(g_mu);
    grad_lv[i] = static_cast<scalar_t>(g_l);
    if (grad_prior_mu != nullptr) grad_prior_mu[i] = static_cast<acc_t>(-g_mu);
    if (grad_prior_lv != nullptr) grad_prior_lv[i] = static_cast<acc_t>(-g_l - 0.5 * g_m * static_cast<double>(m));
  }
}

// Latent columns per block of the column reduction: a warp's lanes.
constexpr int kColumnsPerBlock = 32;

// KL_COLUMNS: lane c of every warp takes column blockIdx.x * 32 + c, warp w its rows w, w + W,
// ... (W warps per block); the warps' sums are then added in warp order: deterministic.
template <typename scalar_t, typename acc_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    gaussian_kl_columns_kernel(const scalar_t* __restrict__ mu,  // [B, D], rows mu_stride apart
                               const scalar_t* __restrict__ lv,  // [B, D], rows lv_stride apart
                               out_t* __restrict__ out,          // [D] column sums
                               KlPrior prior, int64_t mu_stride, int64_t lv_stride, int64_t B, int64_t D) {
  __shared__ acc_t warp_sums[kThreads];
  const int lane = threadIdx.x % kColumnsPerBlock, warp = threadIdx.x / kColumnsPerBlock;
  const int warps = blockDim.x / kColumnsPerBlock;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kColumnsPerBlock + lane;
  acc_t sum = 0;
  if (k < D) {
    for (int64_t b = warp; b < B; b += warps) {
      acc_t m = to_acc<scalar_t, acc_t>(mu[b * mu_stride + k]), l = to_acc<scalar_t, acc_t>(lv[b * lv_stride + k]);
      acc_t e = 1;
      PriorRow<acc_t>(prior, b).standardize(k, m, l, e);
      sum += kl_elem(m, l);
    }
  }
  warp_sums[threadIdx.x] = sum;
  __syncthreads();
  if (warp == 0 && k < D) {
    acc_t total = 0;
    for (int w = 0; w < warps; ++w) total += warp_sums[w * kColumnsPerBlock + lane];
    out[k] = static_cast<out_t>(total);
  }
}

Tensor prior_view(const std::optional<Tensor>& part, const Tensor& mu, const char* name) {
  if (!part.has_value()) return {};
  const Tensor& p = *part;
  check_cuda(p, name, mu);
  TORCH_CHECK(p.scalar_type() == acc_scalar(mu.scalar_type()), "vaekern (cuda): ", name, " must be ",
              acc_scalar(mu.scalar_type()), " (the math dtype of ", mu.scalar_type(), " latents), got ",
              p.scalar_type());
  TORCH_CHECK(at::is_expandable_to(p.sizes(), mu.sizes()), "vaekern (cuda): ", name, " of shape ", p.sizes(),
              " does not broadcast to mu's shape ", mu.sizes());
  const int64_t B = mu.size(0);
  // A view wherever the broadcast allows one (a prior per latent: row stride 0); a layout
  // no [B, D] view can give (one per channel of an image-shaped latent) is copied.
  return p.expand(mu.sizes()).reshape({B, B == 0 ? 0 : mu.numel() / B});
}

Tensor prior_grad_output(const Tensor& part, const Tensor& mu) {
  return part.defined() ? at::empty(mu.sizes(), mu.options().dtype(part.scalar_type())) : at::empty({0}, mu.options());
}

}  // namespace

KlPriorViews kl_prior(const std::optional<Tensor>& prior_mu, const std::optional<Tensor>& prior_logvar,
                      const Tensor& mu) {
  return {prior_view(prior_mu, mu, "prior_mu"), prior_view(prior_logvar, mu, "prior_logvar")};
}

void gaussian_kl_columns(const Rows& m, const Rows& l, at::ScalarType dtype, const KlPrior& prior, const Tensor& sums,
                         cudaStream_t stream) {
  if (m.D == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gaussian_kl_columns", [&] {
    using acc_t = acc_type<scalar_t>;
    auto launch = [&](auto* out) {
      gaussian_kl_columns_kernel<scalar_t, acc_t><<<ceil_div(m.D, kColumnsPerBlock), kThreads, 0, stream>>>(
          m.tensor.data_ptr<scalar_t>(), l.tensor.data_ptr<scalar_t>(), out, prior, m.row_stride, l.row_stride, m.B,
          m.D);
    };
    if (sums.scalar_type() == at::kDouble) launch(sums.data_ptr<double>()); else launch(sums.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gaussian_kl_grads(const Tensor& mu, const Tensor& logvar,
                                                             const KlPriorViews& prior, const RowScale& scale,
                                                             bool per_column, cudaStream_t stream) {
  const Tensor m = mu.contiguous();
  const Tensor l = logvar.contiguous();
  Tensor grad_mu = at::empty(mu.sizes(), mu.options());
  Tensor grad_lv = at::empty(logvar.sizes(), logvar.options());
  Tensor grad_pm = prior_grad_output(prior.mu, mu), grad_plv = prior_grad_output(prior.lv, mu);
  const int64_t n = m.numel();
  if (n == 0) return {grad_mu, grad_lv, grad_pm, grad_plv};
  const int64_t D = n / m.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "gaussian_kl_grads", [&] {
    using acc_t = acc_type<scalar_t>;
    gaussian_kl_grads_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        m.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), grad_mu.data_ptr<scalar_t>(), grad_lv.data_ptr<scalar_t>(),
        prior.mu.defined() ? grad_pm.data_ptr<acc_t>() : nullptr,
        prior.lv.defined() ? grad_plv.data_ptr<acc_t>() : nullptr, prior.operand(), scale, per_column, n, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_mu, grad_lv, grad_pm, grad_plv};
}

}  // namespace cuda
}  // namespace vaekern
