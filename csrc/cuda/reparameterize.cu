// reparameterize and reparameterize_backward on CUDA.
//
// Math: z = mu + exp(lv / 2) * eps (exact, no clamp). Backward:
//   grad_mu = grad_z,  grad_logvar = grad_z * 0.5 * exp(lv / 2) * eps
//
// Noise: either `eps` is given, or `seed` (an int64 tensor of shape (1,) on the device,
// drawn from the torch generator so that CUDA-graph replays get fresh seeds) is read inside
// the kernel and eps is drawn with Philox4x32-10: key = seed, counter = (i / 4, 0) for
// element i, one call giving the 4 float32 normals of elements 4k..4k+3 by Box-Muller.
// Backward regenerates exactly the same eps from the same seed instead of saving it, and
// reparameterize(0, 0, None, seed) returns that eps exactly (exp(0) = 1).
// The normals are float32 whatever the dtype; they are not torch.randn's numbers.
//
// Dtypes: mu, logvar (and eps) float16, bfloat16, float32, float64, computed in float
// (double for double); z and the gradients come back contiguous in mu's dtype.
// Limits: elementwise, one thread per 4 elements, scalar loads (latents are small).
#include "common.cuh"

namespace vaekern {
namespace cuda {
namespace {

// ---- Philox4x32-10 (Salmon et al., SC'11) and Box-Muller --------------------------------------
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k.x += kW0;
      k.y += kW1;
    }
    const uint32_t hi0 = __umulhi(kM0, c.x), lo0 = kM0 * c.x;
    const uint32_t hi1 = __umulhi(kM1, c.z), lo1 = kM1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
  }
  return c;
}

// A uint32 to a float in (0, 1]: never 0, so its log is finite.
__device__ __forceinline__ float to_unit(uint32_t x) { return x * 2.3283064365386963e-10f + 1.1641532182693481e-10f; }

// The 4 standard normals of elements 4k..4k+3.
__device__ __forceinline__ void normals4(uint64_t seed, uint64_t k, float (&out)[4]) {
  const uint4 r = philox4x32_10(make_uint4(static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32), 0u, 0u),
                                make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)));
  float s, c;
  const float r0 = sqrtf(-2.0f * logf(to_unit(r.x)));
  sincospif(2.0f * to_unit(r.y), &s, &c);
  out[0] = r0 * c;
  out[1] = r0 * s;
  const float r1 = sqrtf(-2.0f * logf(to_unit(r.z)));
  sincospif(2.0f * to_unit(r.w), &s, &c);
  out[2] = r1 * c;
  out[3] = r1 * s;
}

// eps of elements 4k..4k+3 (those below n): drawn from the seed, or loaded.
template <bool kSeed, typename scalar_t, typename acc_t>
__device__ __forceinline__ void eps4(const scalar_t* eps, const int64_t* seed, int64_t k, int64_t n, acc_t (&out)[4]) {
  if constexpr (kSeed) {
    float e[4];
    normals4(static_cast<uint64_t>(*seed), static_cast<uint64_t>(k), e);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = static_cast<acc_t>(e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = 4 * k + j < n ? to_acc<scalar_t, acc_t>(eps[4 * k + j]) : acc_t(0);
  }
}

template <bool kSeed, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    reparameterize_fwd_kernel(const scalar_t* __restrict__ mu,   // [n] contiguous
                              const scalar_t* __restrict__ lv,   // [n] contiguous
                              const scalar_t* __restrict__ eps,  // [n] contiguous, or nullptr with a seed
                              const int64_t* __restrict__ seed,  // [1] Philox key, or nullptr with eps
                              scalar_t* __restrict__ z,          // [n] contiguous
                              int64_t n) {
  using acc_t = acc_type<scalar_t>;
  const int64_t groups = (n + 3) / 4;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < groups; k += step) {
    acc_t e[4];
    eps4<kSeed>(eps, seed, k, n, e);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * k + j;
      if (i < n) {
        const acc_t sd = dexp(acc_t(0.5) * to_acc<scalar_t, acc_t>(lv[i]));
        z[i] = static_cast<scalar_t>(to_acc<scalar_t, acc_t>(mu[i]) + sd * e[j]);
      }
    }
  }
}

template <bool kSeed, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    reparameterize_bwd_kernel(const scalar_t* __restrict__ grad_z,  // [n] contiguous
                              const scalar_t* __restrict__ lv,      // [n] contiguous
                              const scalar_t* __restrict__ eps,     // [n] contiguous, or nullptr with a seed
                              const int64_t* __restrict__ seed,     // [1] Philox key, or nullptr with eps
                              scalar_t* __restrict__ grad_mu,       // [n] contiguous
                              scalar_t* __restrict__ grad_lv,       // [n] contiguous
                              int64_t n) {
  using acc_t = acc_type<scalar_t>;
  const int64_t groups = (n + 3) / 4;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < groups; k += step) {
    acc_t e[4];
    eps4<kSeed>(eps, seed, k, n, e);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * k + j;
      if (i < n) {
        const scalar_t g = grad_z[i];
        const acc_t half_sd = acc_t(0.5) * dexp(acc_t(0.5) * to_acc<scalar_t, acc_t>(lv[i]));
        grad_mu[i] = g;
        grad_lv[i] = static_cast<scalar_t>(to_acc<scalar_t, acc_t>(g) * half_sd * e[j]);
      }
    }
  }
}

// Checks the noise arguments; returns eps contiguous in mu's dtype (undefined with a seed).
Tensor check_noise(const Tensor& mu, const Tensor& logvar, const std::optional<Tensor>& eps,
                   const std::optional<Tensor>& seed) {
  check_cuda(mu, "mu", mu);
  check_cuda(logvar, "logvar", mu);
  check_float(mu, "mu");
  TORCH_CHECK(logvar.scalar_type() == mu.scalar_type(), "vaekern (cuda): logvar has dtype ", logvar.scalar_type(),
              " but mu has dtype ", mu.scalar_type());
  TORCH_CHECK(mu.sizes() == logvar.sizes(), "vaekern (cuda): logvar has shape ", logvar.sizes(),
              " but mu has shape ", mu.sizes());
  const bool has_eps = eps.has_value() && eps->defined();
  const bool has_seed = seed.has_value() && seed->defined();
  TORCH_CHECK(has_eps != has_seed, "vaekern (cuda): reparameterize needs exactly one of eps and seed");
  if (has_seed) {
    check_cuda(*seed, "seed", mu);
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() >= 1,
                "vaekern (cuda): seed must be an int64 tensor of shape (1,), got ", seed->scalar_type(), " ",
                seed->sizes());
    return Tensor();
  }
  check_cuda(*eps, "eps", mu);
  check_float(*eps, "eps");
  TORCH_CHECK(eps->sizes() == mu.sizes(), "vaekern (cuda): eps has shape ", eps->sizes(), " but mu has shape ",
              mu.sizes());
  return eps->to(mu.scalar_type()).contiguous();
}

}  // namespace

Tensor reparameterize_cuda(const Tensor& mu, const Tensor& logvar, const std::optional<Tensor>& eps,
                           const std::optional<Tensor>& seed) {
  const Tensor e = check_noise(mu, logvar, eps, seed);
  const c10::cuda::CUDAGuard guard(mu.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor m = mu.contiguous(), l = logvar.contiguous();
  Tensor z = at::empty(mu.sizes(), mu.options());
  const int64_t n = z.numel();
  if (n == 0) return z;
  const unsigned blocks = blocks_for((n + 3) / 4);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparameterize_cuda", [&] {
    if (e.defined()) {
      reparameterize_fwd_kernel<false, scalar_t><<<blocks, kThreads, 0, stream>>>(
          m.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), nullptr, z.data_ptr<scalar_t>(), n);
    } else {
      reparameterize_fwd_kernel<true, scalar_t><<<blocks, kThreads, 0, stream>>>(
          m.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), nullptr, seed->data_ptr<int64_t>(), z.data_ptr<scalar_t>(),
          n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return z;
}

std::tuple<Tensor, Tensor> reparameterize_backward_cuda(const Tensor& grad_z, const Tensor& mu, const Tensor& logvar,
                                                        const std::optional<Tensor>& eps,
                                                        const std::optional<Tensor>& seed) {
  const Tensor e = check_noise(mu, logvar, eps, seed);
  check_cuda(grad_z, "grad_z", mu);
  check_float(grad_z, "grad_z");
  TORCH_CHECK(grad_z.sizes() == mu.sizes(), "vaekern (cuda): grad_z has shape ", grad_z.sizes(),
              " but mu has shape ", mu.sizes());
  const c10::cuda::CUDAGuard guard(mu.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor g = grad_z.to(mu.scalar_type()).contiguous(), l = logvar.contiguous();
  Tensor grad_mu = at::empty(mu.sizes(), mu.options());
  Tensor grad_lv = at::empty(logvar.sizes(), logvar.options());
  const int64_t n = g.numel();
  if (n == 0) return {grad_mu, grad_lv};
  const unsigned blocks = blocks_for((n + 3) / 4);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparameterize_backward_cuda", [&] {
    if (e.defined()) {
      reparameterize_bwd_kernel<false, scalar_t><<<blocks, kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), nullptr,
          grad_mu.data_ptr<scalar_t>(), grad_lv.data_ptr<scalar_t>(), n);
    } else {
      reparameterize_bwd_kernel<true, scalar_t><<<blocks, kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), nullptr, seed->data_ptr<int64_t>(),
          grad_mu.data_ptr<scalar_t>(), grad_lv.data_ptr<scalar_t>(), n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_mu, grad_lv};
}

TORCH_LIBRARY_IMPL(vaekern, CUDA, m) {
  m.impl("reparameterize", &reparameterize_cuda);
  m.impl("reparameterize_backward", &reparameterize_backward_cuda);
}

}  // namespace cuda
}  // namespace vaekern
