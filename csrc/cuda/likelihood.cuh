// The likelihood term of the losses: its stage-1 tile loop, shared by bernoulli_nll.cu and
// the fused vae_loss.cu, and the forward of a loss that is one likelihood term alone.
//
// Adding a likelihood means writing one element functor,
//
//   struct Elem {
//     template <typename acc_t>
//     __device__ __forceinline__ acc_t operator()(acc_t x, acc_t t, acc_t* grad) const;
//   };
//
// which returns the value of one element (its negative log-likelihood for the decoder
// output x and target t) and writes *grad = d value / d x, in the accumulation type (float,
// double for double). Everything else is here and below: likelihood_tile<Elem> runs it
// over a tile of a row, with 128-bit loads where the row allows, summing the values and
// writing grad * grad_scale in the input's dtype; likelihood_forward<Elem> is a whole
// single-term loss (stage 1, then reduce_partials.cuh). bernoulli_nll.cuh holds the one
// likelihood so far, BernoulliNll<from_logits>.
#pragma once

#include "common.cuh"
#include "reduce_partials.cuh"

namespace vaekern {
namespace cuda {

// Stage-1 arguments of a likelihood term.
template <typename scalar_t, typename acc_t>
struct LikelihoodArgs {
  const scalar_t* input;  // [B, D] decoder output (logits, probabilities, ...), rows input_stride apart
  const void* target;     // [B, D] targets of kind target_kind, rows target_stride apart
  scalar_t* grad;         // [B, D] contiguous d loss / d input, or nullptr
  int64_t input_stride, target_stride, D, tile_len;
  int target_kind;
  acc_t grad_scale;       // 1, or 1/B for reduction="mean"
};

// Elements per vector load of the input: 16 bytes of input, or 2 elements when the math is
// in double (float input with float64 latents in vae_loss): 4 elements of double logs at
// once spill on sm_80.
template <typename scalar_t, typename acc_t>
constexpr int likelihood_vec() {
  return sizeof(acc_t) == 8 ? 2 : 16 / static_cast<int>(sizeof(scalar_t));
}

// The lane's share of tile [start, end) of row b: its sum of the element values, and the
// gradient written.
template <typename Elem, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t likelihood_tile(const LikelihoodArgs<scalar_t, acc_t>& a, int64_t b, int64_t start,
                                                 int sub, int G) {
  constexpr int VEC = likelihood_vec<scalar_t, acc_t>();
  constexpr unsigned kBytes = VEC * sizeof(scalar_t);
  const Elem elem{};
  const scalar_t* x = a.input + b * a.input_stride;
  const int tsize = kind_size(a.target_kind);
  const void* t = static_cast<const char*>(a.target) + b * a.target_stride * tsize;
  scalar_t* g = a.grad == nullptr ? nullptr : a.grad + b * a.D;
  const int64_t end = min(start + a.tile_len, a.D);
  acc_t sum = 0;
  int64_t e0 = start;
  const unsigned t_align = VEC * tsize < 16 ? VEC * tsize : 16;
  // The path (and so the order of the sum) depends on the inputs' alignment only: a
  // misaligned gradient row (a row-strided input with an odd row length, say) is stored
  // element by element, so the loss is bitwise the same with and without compute_grad.
  if (is_aligned(x, kBytes) && is_aligned(t, t_align)) {
    const bool g_vec = g != nullptr && is_aligned(g, kBytes);
    const int64_t vend = start + (end - start) / VEC * VEC;
#pragma unroll 1  // ~40 KB in flight per SM at this occupancy covers HBM latency
    for (int64_t e = start + sub * VEC; e < vend; e += G * VEC) {
      const Vec<scalar_t, VEC> xv = load_vec<scalar_t, VEC>(x + e);
      acc_t tv[VEC];
      load_kind_vec<VEC>(t, e, a.target_kind, tv);
      Vec<scalar_t, VEC> gv;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc_t gi;
        sum += elem(to_acc<scalar_t, acc_t>(xv.v[i]), tv[i], &gi);
        gv.v[i] = static_cast<scalar_t>(gi * a.grad_scale);
      }
      if (g_vec) {
        store_vec(g + e, gv);
      } else if (g != nullptr) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) g[e + i] = gv.v[i];
      }
    }
    e0 = vend;
  }
  for (int64_t e = e0 + sub; e < end; e += G) {
    acc_t gi;
    sum += elem(to_acc<scalar_t, acc_t>(x[e]), load_kind<acc_t>(t, e, a.target_kind), &gi);
    if (g != nullptr) g[e] = static_cast<scalar_t>(gi * a.grad_scale);
  }
  return sum;
}

template <typename Elem, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kFwdMinBlocks)
    likelihood_fwd_kernel(LikelihoodArgs<scalar_t, acc_t> a,
                          acc_t* __restrict__ partials,  // [B, tiles_per_row] per-tile sums
                          int64_t B, int64_t tiles_per_row, int G) {
  const GroupPos pos = group_pos(G);
  const int64_t ntiles = B * tiles_per_row;
  for (int64_t first = pos.first; first < ntiles; first += pos.stride) {
    const int64_t tile = first + pos.group;
    acc_t v = 0;
    if (tile < ntiles) {
      const int64_t b = tile / tiles_per_row;
      v = likelihood_tile<Elem>(a, b, (tile - b * tiles_per_row) * a.tile_len, pos.sub, G);
    }
    v = group_sum(v, G);
    if (pos.sub == 0 && tile < ntiles) partials[tile] = v;
  }
}

// A loss that is likelihood Elem alone, over input x and target t (B rows of D): the row
// sums reduced as `reduction` says into out, and, when compute_grad, the gradient of that
// reduced loss for an upstream gradient of 1 into grad (contiguous, input's dtype).
template <typename Elem>
void likelihood_forward(const Rows& x, const Rows& t, at::ScalarType target_dtype, int64_t reduction,
                        bool compute_grad, const Tensor& grad, const Tensor& out, cudaStream_t stream) {
  const int64_t B = x.B, D = x.D;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.tensor.scalar_type(), "likelihood_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const Tiling tl = tiling(B, D, likelihood_vec<scalar_t, acc_t>());
    // With one tile per row and no reduction, the tile sums are the output.
    const bool direct = reduction == 0 && tl.tiles_per_row == 1;
    Tensor partials = direct ? out : at::empty({B * tl.tiles_per_row}, out.options());
    const LikelihoodArgs<scalar_t, acc_t> a{x.tensor.data_ptr<scalar_t>(),
                                            t.tensor.data_ptr(),
                                            compute_grad ? grad.data_ptr<scalar_t>() : nullptr,
                                            x.row_stride,
                                            t.row_stride,
                                            D,
                                            tl.tile_len,
                                            kind_of(target_dtype),
                                            reduction == 1 ? acc_t(1) / static_cast<acc_t>(B) : acc_t(1)};
    if (B > 0) {
      likelihood_fwd_kernel<Elem, scalar_t, acc_t><<<blocks_for(B * tl.tiles_per_row * tl.G), kThreads, 0, stream>>>(
          a, partials.data_ptr<acc_t>(), B, tl.tiles_per_row, tl.G);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!direct) {
      reduce_partials<acc_t>(partials, tl.tiles_per_row, Tensor(), 0, B, reduction, Tensor(), out, Tensor(),
                             Tensor(), stream);
    }
  });
}

}  // namespace cuda
}  // namespace vaekern
