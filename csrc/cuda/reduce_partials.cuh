// Stage 2 of every loss (common.cuh's design): the fixed-order sums of the per-tile
// partials that stage 1 wrote, into the outputs. reduce_partials is the entry point.
//
// Up to two streams of partials are reduced together: the required one (the single term
// of bernoulli_nll or gaussian_kl, or vae_loss's reconstruction term) and, for vae_loss,
// the KL term's, which the loss adds times beta (read on the device):
//   out[s] = sum / divisor,  out_kl[s] = kl_sum / divisor,  out_loss[s] = out[s] + beta * out_kl[s]
// with divisor B for reduction="mean", else 1; out_loss is formed in the KL stream's dtype
// before it is rounded (vae_loss.cu says why its KL is double). For reduction="none", row s
// is one row of the batch; for mean and sum, long flat streams are first shrunk by fixed
// segments, and one block sums what remains. No float atomics; the order depends on the
// shapes only.
//
// Free bits (vae_loss): the KL stream is then the [Z] column sums S_j of the KL over the B
// rows, and the KL term is sum_j where(S_j / B < lambda, lambda, S_j / B), times B for
// sum, with weight[j] = 0 where lambda holds column j (or is NaN), else 1; summed in the
// KL stream's type, in the fixed order of the other sums.
#pragma once

#include "common.cuh"

namespace vaekern {
namespace cuda {

// Row s of the required stream is partials[s*partials_per_row, min((s+1)*partials_per_row,
// num_partials)), likewise for the optional KL stream (present when has_kl). Each output is
// optional but out. has_kl is a flag of its own, not kl_partials != nullptr: the data
// pointer of an empty stream (B = 0) is null, and out_kl and out_loss must still be written
// (NaN for mean, 0 for sum). The KL stream may be wider than acc_t (kl_t: vae_loss's is
// double); out_kl and out_loss are formed in kl_t, then rounded to acc_t.
template <typename acc_t, typename kl_t = acc_t>
struct FinalArgs {
  const acc_t* partials;
  const kl_t* kl_partials;
  bool has_kl;
  int64_t partials_per_row, num_partials, kl_partials_per_row, num_kl_partials, num_rows;
  acc_t divisor;
  const void* beta;  // () of kind beta_kind, read when out_loss is written
  int beta_kind;
  acc_t* out;
  acc_t* out_kl;
  acc_t* out_loss;
  const void* free_bits = nullptr;  // () of kind free_bits_kind: lambda, or nullptr for none
  int free_bits_kind = kF32;
  acc_t* weight = nullptr;  // [Z] out, with free_bits
  kl_t batch = 0;           // B, with free_bits
  kl_t free_bits_factor = 1;  // 1 for mean, B for sum, with free_bits
};

template <typename acc_t, typename kl_t>
__device__ __forceinline__ void final_store(const FinalArgs<acc_t, kl_t>& a, int64_t s, acc_t sum, kl_t kl_sum) {
  sum = sum / a.divisor;
  a.out[s] = sum;
  if (a.has_kl) {
    kl_sum = a.free_bits != nullptr ? kl_sum * a.free_bits_factor : kl_sum / static_cast<kl_t>(a.divisor);
    if (a.out_kl != nullptr) a.out_kl[s] = static_cast<acc_t>(kl_sum);
    if (a.out_loss != nullptr) {
      a.out_loss[s] = static_cast<acc_t>(sum + load_kind<kl_t>(a.beta, 0, a.beta_kind) * kl_sum);
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t strided_sum(const acc_t* p, int64_t begin, int64_t end, int64_t first, int step) {
  acc_t v = 0;
  for (int64_t i = begin + first; i < end; i += step) v += p[i];
  return v;
}

// Row s of each stream, summed by the lanes first, first + step, ...
template <typename acc_t, typename kl_t>
__device__ __forceinline__ acc_t row_sum(const FinalArgs<acc_t, kl_t>& a, int64_t s, int64_t first, int step) {
  return strided_sum(a.partials, s * a.partials_per_row, min((s + 1) * a.partials_per_row, a.num_partials), first,
                     step);
}
template <typename acc_t, typename kl_t>
__device__ __forceinline__ kl_t kl_row_sum(const FinalArgs<acc_t, kl_t>& a, int64_t s, int64_t first, int step) {
  const int64_t begin = s * a.kl_partials_per_row, end = min((s + 1) * a.kl_partials_per_row, a.num_kl_partials);
  if (a.free_bits == nullptr) return strided_sum(a.kl_partials, begin, end, first, step);
  const kl_t lambda = load_kind<kl_t>(a.free_bits, 0, a.free_bits_kind);
  kl_t v = 0;
  for (int64_t j = begin + first; j < end; j += step) {
    const kl_t per = a.kl_partials[j] / a.batch;
    const bool held = per < lambda || lambda != lambda;
    a.weight[j] = held ? acc_t(0) : acc_t(1);
    v += held ? lambda : per;
  }
  return v;
}

// A group of G <= 32 lanes per row (many short rows).
template <typename acc_t, typename kl_t>
__global__ void __launch_bounds__(kThreads) final_group_kernel(FinalArgs<acc_t, kl_t> a, int G) {
  const GroupPos pos = group_pos(G);
  for (int64_t first = pos.first; first < a.num_rows; first += pos.stride) {
    const int64_t s = first + pos.group;
    acc_t sum = 0;
    kl_t kl_sum = 0;
    if (s < a.num_rows) {
      sum = row_sum(a, s, pos.sub, G);
      if (a.has_kl) kl_sum = kl_row_sum(a, s, pos.sub, G);
    }
    sum = group_sum(sum, G);
    kl_sum = group_sum(kl_sum, G);
    if (pos.sub == 0 && s < a.num_rows) final_store(a, s, sum, kl_sum);
  }
}

// A block per row (few long rows).
template <typename acc_t, typename kl_t>
__global__ void __launch_bounds__(kFinalThreads) final_block_kernel(FinalArgs<acc_t, kl_t> a) {
  for (int64_t s = blockIdx.x; s < a.num_rows; s += gridDim.x) {
    acc_t sum = block_sum(row_sum(a, s, threadIdx.x, blockDim.x));
    kl_t kl_sum = 0;
    if (a.has_kl) kl_sum = block_sum(kl_row_sum(a, s, threadIdx.x, blockDim.x));
    if (threadIdx.x == 0) final_store(a, s, sum, kl_sum);
  }
}

template <typename acc_t, typename kl_t>
inline void launch_final(const FinalArgs<acc_t, kl_t>& a, cudaStream_t stream) {
  if (a.num_rows == 0) return;
  const int64_t longest =
      a.has_kl && a.kl_partials_per_row > a.partials_per_row ? a.kl_partials_per_row : a.partials_per_row;
  if (longest > 256 && a.num_rows < 1024) {
    const int64_t blocks = a.num_rows < kMaxBlocks ? a.num_rows : kMaxBlocks;
    final_block_kernel<acc_t, kl_t><<<static_cast<unsigned>(blocks), kFinalThreads, 0, stream>>>(a);
  } else {
    const int G = pow2_at_least(longest, 32);
    final_group_kernel<acc_t, kl_t><<<blocks_for(a.num_rows * G), kThreads, 0, stream>>>(a, G);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shrinks a flat stream of n partials to ceil(n / kSegment) segment sums until at most
// kFlatMax remain; fixed segments, so the order of the sum is fixed.
template <typename acc_t>
inline Tensor shrink_flat(Tensor p, int64_t* n, cudaStream_t stream) {
  while (*n > kFlatMax) {
    const int64_t segments = ceil_div(*n, kSegment);
    Tensor q = at::empty({segments}, p.options());
    const FinalArgs<acc_t> a{.partials = p.data_ptr<acc_t>(),
                             .kl_partials = nullptr,
                             .has_kl = false,
                             .partials_per_row = kSegment,
                             .num_partials = *n,
                             .kl_partials_per_row = 0,
                             .num_kl_partials = 0,
                             .num_rows = segments,
                             .divisor = acc_t(1),
                             .beta = nullptr,
                             .beta_kind = kF32,
                             .out = q.data_ptr<acc_t>(),
                             .out_kl = nullptr,
                             .out_loss = nullptr};
    launch_final(a, stream);
    p = q;
    *n = segments;
  }
  return p;
}

// Stage 2: B rows of partials_per_row partials (required) and of kl_partials_per_row KL
// partials (optional: kl_partials_per_row == 0) into the outputs, reduced over rows as
// `reduction` says. out_kl and out_loss may be undefined; beta is read on the device. The
// KL partials are of kl_t, the outputs all of acc_t. With free_bits (0-d, mean or sum),
// kl_partials holds the kl_partials_per_row = Z column sums instead (the header's), and
// weight (Z elements of acc_t) takes the free bits' weights.
template <typename acc_t, typename kl_t = acc_t>
inline void reduce_partials(const Tensor& partials, int64_t partials_per_row, const Tensor& kl_partials,
                            int64_t kl_partials_per_row, int64_t B, int64_t reduction, const Tensor& beta,
                            const Tensor& out, const Tensor& out_kl, const Tensor& out_loss, cudaStream_t stream,
                            const Tensor& free_bits = Tensor(), const Tensor& weight = Tensor()) {
  const bool free = free_bits.defined();
  const bool has_kl = kl_partials_per_row > 0 || free;
  const void* beta_ptr = beta.defined() ? beta.data_ptr() : nullptr;
  const int beta_kind = beta.defined() ? kind_of(beta.scalar_type()) : kF32;
  acc_t* out_kl_ptr = out_kl.defined() ? out_kl.data_ptr<acc_t>() : nullptr;
  acc_t* out_loss_ptr = out_loss.defined() ? out_loss.data_ptr<acc_t>() : nullptr;
  if (reduction == 0) {
    const FinalArgs<acc_t, kl_t> a{.partials = partials.data_ptr<acc_t>(),
                                   .kl_partials = has_kl ? kl_partials.data_ptr<kl_t>() : nullptr,
                                   .has_kl = has_kl,
                                   .partials_per_row = partials_per_row,
                                   .num_partials = B * partials_per_row,
                                   .kl_partials_per_row = kl_partials_per_row,
                                   .num_kl_partials = B * kl_partials_per_row,
                                   .num_rows = B,
                                   .divisor = acc_t(1),
                                   .beta = beta_ptr,
                                   .beta_kind = beta_kind,
                                   .out = out.data_ptr<acc_t>(),
                                   .out_kl = out_kl_ptr,
                                   .out_loss = out_loss_ptr};
    launch_final(a, stream);
    return;
  }
  int64_t num_partials = B * partials_per_row, num_kl_partials = free ? kl_partials_per_row : B * kl_partials_per_row;
  const Tensor flat = shrink_flat<acc_t>(partials, &num_partials, stream);
  // Free bits apply lambda to each column sum before adding: no segment may pre-sum them.
  const Tensor kl_flat = has_kl && !free ? shrink_flat<kl_t>(kl_partials, &num_kl_partials, stream) : kl_partials;
  // mean over B = 0 rows is 0/0 = NaN, as torch's mean of an empty tensor.
  const acc_t divisor = reduction == 1 ? static_cast<acc_t>(B) : acc_t(1);
  const FinalArgs<acc_t, kl_t> a{.partials = flat.data_ptr<acc_t>(),
                                 .kl_partials = has_kl ? kl_flat.data_ptr<kl_t>() : nullptr,
                                 .has_kl = has_kl,
                                 .partials_per_row = num_partials,
                                 .num_partials = num_partials,
                                 .kl_partials_per_row = num_kl_partials,
                                 .num_kl_partials = num_kl_partials,
                                 .num_rows = 1,
                                 .divisor = divisor,
                                 .beta = beta_ptr,
                                 .beta_kind = beta_kind,
                                 .out = out.data_ptr<acc_t>(),
                                 .out_kl = out_kl_ptr,
                                 .out_loss = out_loss_ptr,
                                 .free_bits = free ? free_bits.data_ptr() : nullptr,
                                 .free_bits_kind = free ? kind_of(free_bits.scalar_type()) : kF32,
                                 .weight = free ? weight.data_ptr<acc_t>() : nullptr,
                                 .batch = static_cast<kl_t>(B),
                                 .free_bits_factor = reduction == 2 ? static_cast<kl_t>(B) : kl_t(1)};
  final_block_kernel<acc_t, kl_t><<<1, kFinalThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace vaekern
