// The base of the CUDA kernels of vaekern (csrc/cuda/<op>.cu): tiling constants, math that
// keeps NaN, vector loads, group reductions, and host-side checks and shapes.
//
// Design
// ------
// One file per op (bernoulli_nll.cu, gaussian_nll.cu, continuous_bernoulli_nll.cu,
// gaussian_kl.cu, reparameterize.cu, vae_loss.cu) holds its checks, launches and
// TORCH_LIBRARY_IMPL. The machinery they share sits in files named
// for their job, listed so that each includes only files listed before it (and
// csrc/conventions.h), never an op's:
//   common.cuh          this file
//   row_scale.cuh       per-row scales of backward (RowScale)
//   reduce_partials.cuh stage 2 (described below)
//   likelihood.cuh      the likelihood term: its stage-1 tile loop, templated on an
//                       element functor (with an optional per-column parameter), the
//                       single-term forward, and the backward's in-place scaling of the
//                       saved gradient
//   kl.cuh/.cu          the Gaussian KL term: element math, tile loop, latent gradients
//   bernoulli_nll.cuh   BernoulliNll, the Bernoulli's element functor
//   gaussian_nll.cuh    GaussianNll, the Gaussian's (per-column log_scale)
//   continuous_bernoulli_nll.cuh
//                       ContinuousBernoulliNll, the continuous Bernoulli's: BernoulliNll
//                       plus the log normalizer
// A new likelihood is one element functor (likelihood.cuh says what it provides), its
// reference, and its op; tiling, reductions, row scaling and the KL are reused.
//
// Every loss is a sum over each row (dim 0 is the batch) followed by a reduction over rows.
// Stage 1 cuts each row of D elements into C = ceil(D / L) tiles and gives each tile to a
// *group* of G lanes of one warp (G a power of two, 1..32, chosen from the row length so
// that short rows do not idle 31 lanes). A group sums its tile with warp shuffles and writes
// one partial, so stage 1 writes B*C partials and no float atomics are used anywhere.
// Stage 2 (`reduce_partials`) sums the partials in a fixed order: per row for
// reduction="none", else flat, in one block, after a deterministic pre-pass of
// segment sums when there are many. The summation order therefore depends only on the
// shapes, dtypes and pointer alignment, never on scheduling: results are bitwise
// reproducible run to run.
//
// Loads are 128-bit where a row's pointers are 16-byte aligned (checked per row, on the
// device), with a scalar tail; misaligned rows (odd row lengths, say) take a scalar path.
// Accumulation is in float, or in double for double inputs (`acc_type`).
//
// NaN in gives NaN out: fmaxf/fminf drop NaN, so every clamp here is written as a compare
// that lets NaN through.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace vaekern {
namespace cuda {

using at::Tensor;

constexpr int kThreads = 256;          // threads per block of the tiled kernels
constexpr int kFwdMinBlocks = 4;       // of the stage-1 loss kernels per SM: <= 64 registers
constexpr int kIters = 8;              // vector loads per lane per tile, at most
constexpr int64_t kWantTiles = 8192;   // about one warp per slot of a 132-SM H100
constexpr int kFinalThreads = 512;     // threads of a block-wide stage-2 block
constexpr int64_t kFlatMax = 16384;    // partials one stage-2 block sums directly
constexpr int64_t kSegment = 4096;     // partials per pre-pass segment beyond that
constexpr int64_t kMaxBlocks = 1 << 20;  // grid cap; the kernels loop over the rest

template <typename T>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };
template <typename T>
using acc_type = typename AccType<T>::type;

// ---- math that keeps NaN ------------------------------------------------------------------
__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dlog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dlog1p(double x) { return log1p(x); }
__device__ __forceinline__ float dexpm1(float x) { return expm1f(x); }
__device__ __forceinline__ double dexpm1(double x) { return expm1(x); }
__device__ __forceinline__ float dfma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double dfma(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float dabs(float x) { return fabsf(x); }
__device__ __forceinline__ double dabs(double x) { return fabs(x); }

// max(x, lo) and min(x, hi) that return NaN for NaN (fmax/fmin would return the bound).
template <typename T>
__device__ __forceinline__ T clamp_min(T x, T lo) { return x < lo ? lo : x; }
template <typename T>
__device__ __forceinline__ T clamp_max(T x, T hi) { return x > hi ? hi : x; }

// ---- vector loads ---------------------------------------------------------------------------
template <typename T, int N>
struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

__device__ __forceinline__ bool is_aligned(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Element kinds read at run time (targets, latents of vae_loss, grad_out scales): each is
// read in its own width; a warp-uniform switch costs a few instructions per 16 bytes.
enum Kind : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3, kU8 = 4 };

inline Kind kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kByte:
    case at::kBool: return kU8;  // bool is one byte holding 0 or 1
    default: TORCH_CHECK(false, "vaekern: unsupported dtype ", t);
  }
}

__host__ __device__ inline int kind_size(int k) {
  return k == kF64 ? 8 : k == kF32 ? 4 : k == kU8 ? 1 : 2;
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_kind(const void* p, int64_t i, int kind) {
  switch (kind) {
    case kF32: return static_cast<acc_t>(static_cast<const float*>(p)[i]);
    case kF64: return static_cast<acc_t>(static_cast<const double*>(p)[i]);
    case kF16: return static_cast<acc_t>(static_cast<float>(static_cast<const at::Half*>(p)[i]));
    case kBF16: return static_cast<acc_t>(static_cast<float>(static_cast<const at::BFloat16*>(p)[i]));
    default: return static_cast<acc_t>(static_cast<const uint8_t*>(p)[i]);
  }
}

template <int N, typename T, typename acc_t>
__device__ __forceinline__ void load_vec_as(const void* p, int64_t e, acc_t (&out)[N]) {
  const Vec<T, N> v = load_vec<T, N>(static_cast<const T*>(p) + e);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<acc_t>(static_cast<float>(v.v[i]));
}
template <int N, typename acc_t>
__device__ __forceinline__ void load_vec_as_double(const void* p, int64_t e, acc_t (&out)[N]) {
  const Vec<double, N> v = load_vec<double, N>(static_cast<const double*>(p) + e);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<acc_t>(v.v[i]);
}

// N consecutive elements of kind `kind` from p[e..e+N), p aligned to min(16, N*size).
template <int N, typename acc_t>
__device__ __forceinline__ void load_kind_vec(const void* p, int64_t e, int kind, acc_t (&out)[N]) {
  switch (kind) {
    case kF32: load_vec_as<N, float>(p, e, out); break;
    case kF64: load_vec_as_double<N>(p, e, out); break;
    case kF16: load_vec_as<N, at::Half>(p, e, out); break;
    case kBF16: load_vec_as<N, at::BFloat16>(p, e, out); break;
    default: {
      const Vec<uint8_t, N> v = load_vec<uint8_t, N>(static_cast<const uint8_t*>(p) + e);
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = static_cast<acc_t>(v.v[i]);
    }
  }
}

template <typename T, typename acc_t>
__device__ __forceinline__ acc_t to_acc(T x) {
  return static_cast<acc_t>(static_cast<float>(x));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double x) { return x; }

// ---- group reductions -------------------------------------------------------------------
// Butterfly over the G lanes of a group (lanes [k*G, (k+1)*G) of a warp). Every lane of the
// warp must call it: the loop bound is warp-uniform, so no lane skips a shuffle.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int G) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    if (off < G) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); the result is valid
// in thread 0. Fixed order: warp butterflies, then warp 0 over the warp sums.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = group_sum(v, 32);
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  v = (warp == 0 && lane < nwarps) ? warp_sums[lane] : T(0);
  if (warp == 0) v = group_sum(v, 32);
  return v;
}

// Position of this thread's group: `first` is the tile of the warp's first group; loops
// advance it by `stride` tiles. Loop bounds that depend only on `first` are warp-uniform.
struct GroupPos {
  int sub;        // lane within the group, 0..G-1
  int group;      // group within the warp
  int64_t first;  // tile of group 0 of this warp in the first round
  int64_t stride; // tiles per round over the whole grid
};

__device__ __forceinline__ GroupPos group_pos(int G) {
  const int lane = threadIdx.x & 31;
  const int per_warp = 32 / G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  return GroupPos{lane & (G - 1), lane / G, warp * per_warp, nwarps * per_warp};
}

// ---- host helpers ---------------------------------------------------------------------------
inline int pow2_at_least(int64_t n, int cap) {
  int g = 1;
  while (g < cap && g < n) g <<= 1;
  return g;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned blocks_for(int64_t threads) {
  int64_t blocks = ceil_div(threads, kThreads);
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

// A (B, ...) tensor viewed as B rows of D elements: a row stride, with the rest of each row
// contiguous. Anything else is copied contiguous first.
struct Rows {
  Tensor tensor;  // the input, or its contiguous copy
  int64_t B, D, row_stride;
};

inline Rows as_rows(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "vaekern: expected a tensor with a batch dim, got a 0-d tensor");
  const int64_t B = x.size(0);
  int64_t D = 1;
  for (int64_t d = 1; d < x.dim(); ++d) D *= x.size(d);
  bool inner_contiguous = true;
  int64_t expected = 1;
  for (int64_t d = x.dim() - 1; d >= 1; --d) {
    if (x.size(d) == 1) continue;
    if (x.stride(d) != expected) {
      inner_contiguous = false;
      break;
    }
    expected *= x.size(d);
  }
  if (!inner_contiguous) {
    Tensor c = x.contiguous();
    return Rows{c, B, D, D};
  }
  return Rows{x, B, D, B > 1 ? x.stride(0) : D};
}

inline void check_cuda(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "vaekern (cuda): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "vaekern (cuda): ", name, " is on ", t.device(),
              " but the other inputs are on ", like.device());
}

inline void check_float(const Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "vaekern (cuda): ", name, " must be float16, bfloat16, float32 or float64, got ", s);
}

// mu and logvar of one shape and float dtype, with a batch dim, on like's device.
inline void check_latents(const Tensor& mu, const Tensor& logvar, const Tensor& like) {
  check_cuda(mu, "mu", like);
  check_cuda(logvar, "logvar", like);
  check_float(mu, "mu");
  TORCH_CHECK(logvar.scalar_type() == mu.scalar_type(), "vaekern (cuda): logvar has dtype ", logvar.scalar_type(),
              " but mu has dtype ", mu.scalar_type());
  TORCH_CHECK(mu.sizes() == logvar.sizes(), "vaekern (cuda): logvar has shape ", logvar.sizes(),
              " but mu has shape ", mu.sizes());
  TORCH_CHECK(mu.dim() >= 1, "vaekern (cuda): mu must have a batch dim");
}

inline void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "vaekern: reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
}

// The shape of a loss: (B,) for reduction="none", else ().
inline std::vector<int64_t> loss_shape(int64_t reduction, int64_t B) {
  return reduction == 0 ? std::vector<int64_t>{B} : std::vector<int64_t>{};
}

inline at::ScalarType acc_scalar(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Tiles of B rows of D elements for groups of G lanes, each lane doing up to kIters vector
// loads of `vec` elements per tile. Fewer loads per tile when that leaves fewer than
// kWantTiles tiles, so that small batches (128 x 784, say) still spread over every SM.
// G is at least `min_lanes` (the latent length of vae_loss), so one group fits both terms.
struct Tiling {
  int G;
  int64_t tile_len, tiles_per_row;
};

inline Tiling tiling(int64_t B, int64_t D, int vec, int64_t min_lanes = 1) {
  const int64_t lanes = std::max(ceil_div(D, vec), min_lanes);
  const int G = pow2_at_least(lanes, 32);
  int iters = kIters;
  while (iters > 1 && B * ceil_div(D, static_cast<int64_t>(G) * vec * iters) < kWantTiles) iters >>= 1;
  const int64_t len = static_cast<int64_t>(G) * vec * iters;
  return Tiling{G, len, std::max<int64_t>(1, ceil_div(D, len))};
}

}  // namespace cuda
}  // namespace vaekern
