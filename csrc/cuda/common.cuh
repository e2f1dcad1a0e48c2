// Shared machinery of the CUDA kernels of vaekern (csrc/cuda/<op>.cu).
//
// Design
// ------
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
  Tensor t;
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

// ---- per-row scales of the backward kernels -------------------------------------------------
// s_b = (a_b * beta + c_b) / divisor, each operand () (stride 0) or (B,), float or double,
// evaluated in double. a is required; beta and c are optional.
struct RowScale {
  const void* a;
  const void* beta;
  const void* c;
  int64_t sa, sc;
  int ka, kbeta, kc;
  double divisor;

  __device__ __forceinline__ double operator()(int64_t b) const {
    double s = load_kind<double>(a, b * sa, ka);
    if (beta != nullptr) s *= load_kind<double>(beta, 0, kbeta);
    if (c != nullptr) s += load_kind<double>(c, b * sc, kc);
    return divisor == 1.0 ? s : s / divisor;
  }
};

// A () or (B,) gradient of a loss, as a RowScale operand (any float dtype, any stride).
inline Tensor scale_operand(const Tensor& g, const Tensor& like, int64_t B, const char* name, int64_t* stride) {
  check_cuda(g, name, like);
  check_float(g, name);
  TORCH_CHECK(g.dim() == 0 || (g.dim() == 1 && g.size(0) == B), "vaekern (cuda): ", name,
              " must have shape () or (", B, ",), got ", g.sizes());
  Tensor t = g;
  if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble) t = t.to(at::kFloat);
  *stride = t.dim() == 0 ? 0 : t.stride(0);
  return t;
}

// ---- stage 2 --------------------------------------------------------------------------------
// Row s of stream r is pr[s*cr, min((s+1)*cr, nr)), likewise for the optional stream k
// (present when has_k). Writes out_r[s] = sum_r / divisor, out_k[s] = sum_k / divisor and
// out_loss[s] = out_r[s] + beta * out_k[s] (each output optional but out_r).
// has_k is a flag of its own, not pk != nullptr: the data pointer of an empty stream
// (B = 0) is null, and out_k and out_loss must still be written (NaN for mean, 0 for sum).
template <typename acc_t>
struct FinalArgs {
  const acc_t* pr;
  const acc_t* pk;
  bool has_k;
  int64_t cr, nr, ck, nk, nrows;
  acc_t divisor;
  const void* beta;
  int kbeta;
  acc_t* out_r;
  acc_t* out_k;
  acc_t* out_loss;
};

template <typename acc_t>
__device__ __forceinline__ void final_store(const FinalArgs<acc_t>& a, int64_t s, acc_t r, acc_t k) {
  r = r / a.divisor;
  a.out_r[s] = r;
  if (a.has_k) {
    k = k / a.divisor;
    if (a.out_k != nullptr) a.out_k[s] = k;
    if (a.out_loss != nullptr) a.out_loss[s] = r + load_kind<acc_t>(a.beta, 0, a.kbeta) * k;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t strided_sum(const acc_t* p, int64_t begin, int64_t end, int64_t first, int step) {
  acc_t v = 0;
  for (int64_t i = begin + first; i < end; i += step) v += p[i];
  return v;
}

// A group of G <= 32 lanes per row (many short rows).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) final_group_kernel(FinalArgs<acc_t> a, int G) {
  const GroupPos pos = group_pos(G);
  for (int64_t first = pos.first; first < a.nrows; first += pos.stride) {
    const int64_t s = first + pos.group;
    acc_t r = 0, k = 0;
    if (s < a.nrows) {
      r = strided_sum(a.pr, s * a.cr, min((s + 1) * a.cr, a.nr), pos.sub, G);
      if (a.has_k) k = strided_sum(a.pk, s * a.ck, min((s + 1) * a.ck, a.nk), pos.sub, G);
    }
    r = group_sum(r, G);
    k = group_sum(k, G);
    if (pos.sub == 0 && s < a.nrows) final_store(a, s, r, k);
  }
}

// A block per row (few long rows).
template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads) final_block_kernel(FinalArgs<acc_t> a) {
  for (int64_t s = blockIdx.x; s < a.nrows; s += gridDim.x) {
    acc_t r = block_sum(strided_sum(a.pr, s * a.cr, min((s + 1) * a.cr, a.nr), threadIdx.x, blockDim.x));
    acc_t k = 0;
    if (a.has_k) k = block_sum(strided_sum(a.pk, s * a.ck, min((s + 1) * a.ck, a.nk), threadIdx.x, blockDim.x));
    if (threadIdx.x == 0) final_store(a, s, r, k);
  }
}

template <typename acc_t>
inline void launch_final(const FinalArgs<acc_t>& a, cudaStream_t stream) {
  if (a.nrows == 0) return;
  const int64_t longest = a.has_k && a.ck > a.cr ? a.ck : a.cr;
  if (longest > 256 && a.nrows < 1024) {
    const int64_t blocks = a.nrows < kMaxBlocks ? a.nrows : kMaxBlocks;
    final_block_kernel<acc_t><<<static_cast<unsigned>(blocks), kFinalThreads, 0, stream>>>(a);
  } else {
    const int G = pow2_at_least(longest, 32);
    final_group_kernel<acc_t><<<blocks_for(a.nrows * G), kThreads, 0, stream>>>(a, G);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shrinks a flat stream of n partials to ceil(n / kSegment) segment sums until at most
// kFlatMax remain; fixed segments, so the order of the sum is fixed.
template <typename acc_t>
inline Tensor shrink_flat(Tensor p, int64_t* n, cudaStream_t stream) {
  while (*n > kFlatMax) {
    const int64_t segs = ceil_div(*n, kSegment);
    Tensor q = at::empty({segs}, p.options());
    FinalArgs<acc_t> a{p.data_ptr<acc_t>(), nullptr, false, kSegment, *n, 0, 0, segs, acc_t(1), nullptr, kF32,
                       q.data_ptr<acc_t>(), nullptr, nullptr};
    launch_final(a, stream);
    p = q;
    *n = segs;
  }
  return p;
}

// Stage 2: B rows of cr partials (stream r, required) and of ck partials (stream k,
// optional: ck == 0) into the outputs, reduced over rows as `reduction` says. out_k and
// out_loss may be undefined; beta is read on the device.
template <typename acc_t>
inline void reduce_partials(const Tensor& pr, int64_t cr, const Tensor& pk, int64_t ck, int64_t B, int64_t reduction,
                            const Tensor& beta, const Tensor& out_r, const Tensor& out_k, const Tensor& out_loss,
                            cudaStream_t stream) {
  const bool two = ck > 0;
  const void* beta_ptr = beta.defined() ? beta.data_ptr() : nullptr;
  const int kbeta = beta.defined() ? kind_of(beta.scalar_type()) : kF32;
  acc_t* o_k = out_k.defined() ? out_k.data_ptr<acc_t>() : nullptr;
  acc_t* o_loss = out_loss.defined() ? out_loss.data_ptr<acc_t>() : nullptr;
  if (reduction == 0) {
    FinalArgs<acc_t> a{pr.data_ptr<acc_t>(), two ? pk.data_ptr<acc_t>() : nullptr, two, cr, B * cr, ck, B * ck, B,
                       acc_t(1), beta_ptr, kbeta, out_r.data_ptr<acc_t>(), o_k, o_loss};
    launch_final(a, stream);
    return;
  }
  int64_t nr = B * cr, nk = B * ck;
  Tensor qr = shrink_flat<acc_t>(pr, &nr, stream);
  Tensor qk = two ? shrink_flat<acc_t>(pk, &nk, stream) : pk;
  // mean over B = 0 rows is 0/0 = NaN, as torch's mean of an empty tensor.
  const acc_t divisor = reduction == 1 ? static_cast<acc_t>(B) : acc_t(1);
  FinalArgs<acc_t> a{qr.data_ptr<acc_t>(), two ? qk.data_ptr<acc_t>() : nullptr, two, nr, nr, nk, nk, 1,
                     divisor, beta_ptr, kbeta, out_r.data_ptr<acc_t>(), o_k, o_loss};
  final_block_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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

// Scales row b of `grad` (any strides) by scale(b) in place; rows whose factor is exactly 1
// are not touched (bernoulli_nll.cu; also run by vae_loss_backward_).
void scale_rows_(const Tensor& grad, const RowScale& scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace vaekern
