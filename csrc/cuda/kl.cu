// gaussian_kl_grads (kl.cuh): the latent gradients of the KL term for per-row scales s_b,
//   grad_mu = s_b * mu,  grad_logvar = s_b * 0.5 * (exp(min(lv, 60)) - 1)
// recomputed from mu and logvar (latent-sized, cheap) by gaussian_kl_backward and
// vae_loss_backward_.
//
// Dtypes: mu and logvar float16, bfloat16, float32 or float64, the same for both; the
// derivatives computed in float (double for double), their products with s in double,
// stored in mu's dtype.
// Limits: one thread per element, scalar loads (latents are small); non-contiguous latents
// are copied to contiguous first.
#include "kl.cuh"

namespace vaekern {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    gaussian_kl_grads_kernel(const scalar_t* __restrict__ mu,  // [B, D] contiguous
                             const scalar_t* __restrict__ lv,  // [B, D] contiguous
                             scalar_t* __restrict__ grad_mu,   // [B, D] contiguous
                             scalar_t* __restrict__ grad_lv,   // [B, D] contiguous
                             RowScale scale, int64_t n, int64_t D) {
  using acc_t = acc_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    // The scale stays double (a float64 loss's upstream times beta may be beyond float's
    // range, or below its normals): each product in double, rounded once to scalar_t.
    const double s = scale(i / D);
    grad_mu[i] = static_cast<scalar_t>(s * static_cast<double>(to_acc<scalar_t, acc_t>(mu[i])));
    grad_lv[i] = static_cast<scalar_t>(s * static_cast<double>(kl_grad_lv(to_acc<scalar_t, acc_t>(lv[i]))));
  }
}

}  // namespace

std::tuple<Tensor, Tensor> gaussian_kl_grads(const Tensor& mu, const Tensor& logvar, const RowScale& scale,
                                             cudaStream_t stream) {
  const Tensor m = mu.contiguous();
  const Tensor l = logvar.contiguous();
  Tensor grad_mu = at::empty(mu.sizes(), mu.options());
  Tensor grad_lv = at::empty(logvar.sizes(), logvar.options());
  const int64_t n = m.numel();
  if (n == 0) return {grad_mu, grad_lv};
  const int64_t D = n / m.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "gaussian_kl_grads", [&] {
    gaussian_kl_grads_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        m.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), grad_mu.data_ptr<scalar_t>(), grad_lv.data_ptr<scalar_t>(),
        scale, n, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_mu, grad_lv};
}

}  // namespace cuda
}  // namespace vaekern
