// The likelihood term of the losses: its stage-1 tile loop, shared by bernoulli_nll.cu and
// the fused vae_loss.cu, and the forward of a loss that is one likelihood term alone.
//
// Adding a likelihood means writing one element functor,
//
//   struct Elem {
//     static constexpr bool kColumnParam = ...;  // reads a per-column parameter p
//     template <typename acc_t>
//     __device__ __forceinline__ acc_t operator()(acc_t x, acc_t t, acc_t p, acc_t* grad) const;
//   };
//
// which returns the value of one element (its negative log-likelihood for the decoder
// output x and target t) and writes *grad = d value / d x, in the accumulation type (float,
// double for double). p is column d's entry of a parameter of the likelihood (the
// Gaussian's log_scale[d]) when kColumnParam, else 0 and never loaded: a functor without
// one compiles to the same code as if p did not exist. Everything else is here and below:
// likelihood_tile<Elem> runs it over a tile of a row, with 128-bit loads where the row
// allows, summing the values and writing grad * grad_scale in the input's dtype;
// likelihood_forward<Elem> is a whole single-term loss (stage 1, then
// reduce_partials.cuh); scale_likelihood_rows_<Elem> is the backward's scaling of the
// saved gradient. The likelihoods: BernoulliNll<from_logits> (bernoulli_nll.cuh),
// GaussianNll (gaussian_nll.cuh), ContinuousBernoulliNll<from_logits>
// (continuous_bernoulli_nll.cuh).
#pragma once

#include "common.cuh"
#include "reduce_partials.cuh"
#include "row_scale.cuh"

namespace vaekern {
namespace cuda {

// A per-column parameter of a likelihood: column d reads param[d * stride] (stride 0 for one
// value for every column). nullptr for a likelihood without one.
template <typename acc_t>
struct ColumnParam {
  const acc_t* param = nullptr;  // [D] or [], in the accumulation type
  int64_t stride = 0;

  __device__ __forceinline__ acc_t at(int64_t d) const { return param[d * stride]; }
};

// p of Elem for column d: loaded only when Elem takes one.
template <typename Elem, typename acc_t>
__device__ __forceinline__ acc_t column_param(const ColumnParam<acc_t>& c, int64_t d) {
  if constexpr (Elem::kColumnParam) {
    return c.at(d);
  } else {
    return acc_t(0);
  }
}

// The host side: an undefined tensor for none, else a () or (D,) tensor of the accumulation
// dtype (the op checks its shape and dtype; a likelihood with a parameter requires one).
template <typename Elem, typename acc_t>
ColumnParam<acc_t> column_param_of(const Tensor& param) {
  TORCH_CHECK(param.defined() == Elem::kColumnParam,
              "vaekern (cuda): internal error: a likelihood's per-column parameter is ",
              param.defined() ? "given but unused" : "missing");
  if (!param.defined()) return {};
  return {param.data_ptr<acc_t>(), param.dim() == 0 ? 0 : param.stride(0)};
}

// Stage-1 arguments of a likelihood term.
template <typename scalar_t, typename acc_t>
struct LikelihoodArgs {
  const scalar_t* input;  // [B, D] decoder output (logits, probabilities, ...), rows input_stride apart
  const void* target;     // [B, D] targets of kind target_kind, rows target_stride apart
  scalar_t* grad;         // [B, D] contiguous d loss / d input, or nullptr
  int64_t input_stride, target_stride, D, tile_len;
  int target_kind;
  acc_t grad_scale;       // 1, or 1/B for reduction="mean"
  ColumnParam<acc_t> param = {};  // the likelihood's per-column parameter, if it has one
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
        // A parameter (D values, shared by every row) is read element by element: it stays
        // in L1/L2, and a vector of it would cost VEC registers at this occupancy.
        sum += elem(to_acc<scalar_t, acc_t>(xv.v[i]), tv[i], column_param<Elem>(a.param, e + i), &gi);
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
    sum += elem(to_acc<scalar_t, acc_t>(x[e]), load_kind<acc_t>(t, e, a.target_kind), column_param<Elem>(a.param, e),
                &gi);
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
// reduced loss for an upstream gradient of 1 into grad (contiguous, input's dtype). param
// is Elem's per-column parameter (column_param_of), undefined for none.
template <typename Elem>
void likelihood_forward(const Rows& x, const Rows& t, at::ScalarType target_dtype, int64_t reduction,
                        bool compute_grad, const Tensor& grad, const Tensor& out, cudaStream_t stream,
                        const Tensor& param = Tensor()) {
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
                                            reduction == 1 ? acc_t(1) / static_cast<acc_t>(B) : acc_t(1),
                                            column_param_of<Elem, acc_t>(param)};
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

// ---- backward: the saved gradient's rows scaled in place ---------------------------------
//
// g[b, :] *= s_b, in one pass over the tiles of the forward's tiling; a group whose s_b is
// exactly 1 returns without touching g, so the usual loss.backward() moves no image-sized
// bytes. The product is formed in float (double for double) and rounded once to g's dtype.
//
// A float16 element outside float16's normal range is recomputed from the likelihood's
// input and target, times grad_scale and s_b, in float, and rounded once. Forward stored
// the gradient for an upstream of 1 (with 1/B for mean): beyond 65504 it overflowed to
// inf, where an upstream below 1 (a loss weight, 1/accumulation steps) brings it back;
// below 2^-14 it is a subnormal with fewer than 11 bits, or 0, where a GradScaler's
// upstream (65536) would have kept them all. Only float16 has a narrower range than its
// float math (bfloat16 has float's); the check is two compares per element of the rows
// that are scaled at all.

// The likelihood's operands, for that recompute: as LikelihoodArgs, without the output.
template <typename scalar_t, typename acc_t>
struct RecomputeArgs {
  const scalar_t* input;  // [B, D], rows input_stride apart
  const void* target;     // [B, D] of kind target_kind, rows target_stride apart
  int64_t input_stride, target_stride;
  int target_kind;
  acc_t grad_scale;       // 1, or 1/B for reduction="mean"
  ColumnParam<acc_t> param = {};  // the likelihood's per-column parameter, if it has one
};

// Whether a stored float16 gradient lost its value: beyond float16's largest (inf) or below
// its smallest normal, 2^-14 (a subnormal, or 0). NaN is neither and stays.
template <typename acc_t>
__device__ __forceinline__ bool lost_in_half(acc_t v) {
  const acc_t mag = dabs(v);
  return mag > acc_t(65504) || mag < acc_t(6.103515625e-05);
}

// Element e of row b recomputed from the likelihood's input and target, times grad_scale
// and the row's scale s, rounded once.
template <typename Elem, typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t recomputed_element(const RecomputeArgs<scalar_t, acc_t>& r, int64_t b, int64_t e,
                                                       acc_t s) {
  const int64_t t_off = b * r.target_stride * kind_size(r.target_kind);
  acc_t d;
  Elem{}(to_acc<scalar_t, acc_t>(r.input[b * r.input_stride + e]),
         load_kind<acc_t>(static_cast<const char*>(r.target) + t_off, e, r.target_kind), column_param<Elem>(r.param, e),
         &d);
  return static_cast<scalar_t>(d * r.grad_scale * s);
}

template <typename Elem, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    scale_rows_kernel(scalar_t* __restrict__ g,  // [B, D] saved gradient, contiguous, in place
                      RowScale scale, RecomputeArgs<scalar_t, acc_type<scalar_t>> r, int64_t B, int64_t D,
                      int64_t tile_len, int64_t tiles_per_row, int G) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  constexpr bool kRecompute = std::is_same_v<scalar_t, at::Half>;
  using acc_t = acc_type<scalar_t>;
  const GroupPos pos = group_pos(G);
  const int64_t ntiles = B * tiles_per_row;
  for (int64_t first = pos.first; first < ntiles; first += pos.stride) {
    const int64_t tile = first + pos.group;
    if (tile >= ntiles) continue;  // no shuffles below: lanes may leave
    const int64_t b = tile / tiles_per_row;
    const double s = scale(b);
    if (s == 1.0) continue;
    scalar_t* row = g + b * D;
    const int64_t start = (tile - b * tiles_per_row) * tile_len;
    const int64_t end = min(start + tile_len, D);
    int64_t e0 = start;
    const acc_t sa = static_cast<acc_t>(s);
    if (is_aligned(row, 16)) {
      const int64_t vend = start + (end - start) / VEC * VEC;
      for (int64_t e = start + pos.sub * VEC; e < vend; e += G * VEC) {
        Vec<scalar_t, VEC> v = load_vec<scalar_t, VEC>(row + e);
        unsigned lost = 0;  // lanes to recompute
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const acc_t a = to_acc<scalar_t, acc_t>(v.v[i]);
          if constexpr (kRecompute) lost |= static_cast<unsigned>(lost_in_half(a)) << i;
          v.v[i] = static_cast<scalar_t>(a * sa);
        }
        store_vec(row + e, v);
        if constexpr (kRecompute) {
          // Rare, and written over the stored vector one element at a time: the likelihood's
          // math inlined per lane of the unrolled loop spilled 16 bytes (BernoulliNll<true>,
          // Half, sm_80 and sm_90), and indexing the vector by lane put it on the stack.
#pragma unroll 1
          for (int i = 0; lost != 0; ++i, lost >>= 1) {
            if (lost & 1u) row[e + i] = recomputed_element<Elem>(r, b, e + i, sa);
          }
        }
      }
      e0 = vend;
    }
    for (int64_t e = e0 + pos.sub; e < end; e += G) {
      const acc_t a = to_acc<scalar_t, acc_t>(row[e]);
      if constexpr (kRecompute) {
        if (lost_in_half(a)) {
          row[e] = recomputed_element<Elem>(r, b, e, sa);
          continue;
        }
      }
      row[e] = static_cast<scalar_t>(a * sa);
    }
  }
}

// Scales row b of `grad`, the saved gradient of likelihood Elem over input and target
// (and Elem's per-column parameter param, undefined for none) with grad_scale folded in,
// by scale(b) in place.
template <typename Elem>
void scale_likelihood_rows_(const Tensor& grad, const RowScale& scale, const Tensor& input, const Tensor& target,
                            double grad_scale, cudaStream_t stream, const Tensor& param = Tensor()) {
  if (grad.numel() == 0) return;
  Tensor g = grad.is_contiguous() ? grad : grad.contiguous();
  const int64_t B = g.size(0), D = g.numel() / B;
  // Only float16 reads input and target: no copy of a strided one otherwise.
  Rows x{}, t{};
  if (g.scalar_type() == at::kHalf) {
    check_cuda(input, "input", grad);
    check_cuda(target, "target", grad);
    TORCH_CHECK(input.sizes() == grad.sizes() && input.scalar_type() == grad.scalar_type() &&
                    target.sizes() == grad.sizes(),
                "vaekern (cuda): the saved gradient has shape ", grad.sizes(), " and dtype ", grad.scalar_type(),
                " but its input has shape ", input.sizes(), " and dtype ", input.scalar_type(),
                ", its target shape ", target.sizes());
    x = as_rows(input);
    t = as_rows(target);
  }
  AT_DISPATCH_SWITCH(g.scalar_type(), "vaekern scale_likelihood_rows_",
                     AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, [&] {
                       using acc_t = acc_type<scalar_t>;
                       RecomputeArgs<scalar_t, acc_t> r{};
                       if (x.tensor.defined()) {
                         r = {x.tensor.data_ptr<scalar_t>(), t.tensor.data_ptr(), x.row_stride, t.row_stride,
                              kind_of(target.scalar_type()), static_cast<acc_t>(grad_scale),
                              column_param_of<Elem, acc_t>(param)};
                       }
                       const Tiling tl = tiling(B, D, 16 / sizeof(scalar_t));
                       scale_rows_kernel<Elem, scalar_t><<<blocks_for(B * tl.tiles_per_row * tl.G), kThreads, 0,
                                                           stream>>>(g.data_ptr<scalar_t>(), scale, r, B, D,
                                                                     tl.tile_len, tl.tiles_per_row, tl.G);
                       C10_CUDA_KERNEL_LAUNCH_CHECK();
                     }));
  if (!g.is_same(grad)) grad.copy_(g);
}

}  // namespace cuda
}  // namespace vaekern
