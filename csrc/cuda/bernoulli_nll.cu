// bernoulli_nll and bernoulli_nll_backward_ on CUDA.
//
// Math (see losses.cuh): per element nll(x, t) and its derivative; per row the sum over
// D = numel / B elements; reduced over rows by `reduction` (0 none, 1 mean, 2 sum).
//
// Forward: one pass over (input, target) writes per-tile partial sums and, when
// compute_grad, the gradient of the *reduced* loss for an upstream gradient of 1 (mean
// folds in 1/B), contiguous in input's dtype. Stage 2 sums the partials in a fixed order
// (common.cuh). Nothing else is saved: backward only scales that gradient row by row.
//
// Backward (in place): row b of grad_input times grad_out[b] (or the scalar grad_out);
// rows whose factor is exactly 1 are not touched.
//
// Dtypes: input float16, bfloat16, float32, float64 (accumulated in float, double for
// double); target any of those, bool or uint8, read in its own width. Losses are float32,
// float64 for float64 input.
// Limits: rows whose pointers are not 16-byte aligned (odd row lengths) use scalar loads.
#include "losses.cuh"

namespace vaekern {
namespace cuda {
namespace {

template <bool kLogits, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kFwdMinBlocks)
    bernoulli_nll_fwd_kernel(ReconArgs<scalar_t, acc_t> a,
                             acc_t* __restrict__ partials,  // [B, tiles_per_row] per-tile sums
                             int64_t B, int64_t tiles_per_row, int G) {
  const GroupPos pos = group_pos(G);
  const int64_t ntiles = B * tiles_per_row;
  for (int64_t first = pos.first; first < ntiles; first += pos.stride) {
    const int64_t tile = first + pos.group;
    acc_t v = 0;
    if (tile < ntiles) {
      const int64_t b = tile / tiles_per_row;
      v = recon_tile<kLogits>(a, b, (tile - b * tiles_per_row) * a.tile_len, pos.sub, G);
    }
    v = group_sum(v, G);
    if (pos.sub == 0 && tile < ntiles) partials[tile] = v;
  }
}

// g[b, :] *= s_b for a contiguous (B, D) gradient. A group whose s_b is exactly 1 returns
// without touching g, so the usual loss.backward() moves no image-sized bytes.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    scale_rows_kernel(scalar_t* __restrict__ g,  // [B, D] saved gradient, contiguous, in place
                      RowScale scale, int64_t B, int64_t D, int64_t tile_len, int64_t tiles_per_row, int G) {
  constexpr int VEC = 16 / sizeof(scalar_t);
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
#pragma unroll
        for (int i = 0; i < VEC; ++i) v.v[i] = static_cast<scalar_t>(to_acc<scalar_t, acc_t>(v.v[i]) * sa);
        store_vec(row + e, v);
      }
      e0 = vend;
    }
    for (int64_t e = e0 + pos.sub; e < end; e += G) row[e] = static_cast<scalar_t>(to_acc<scalar_t, acc_t>(row[e]) * sa);
  }
}

}  // namespace

// Scales the rows of `grad` (contiguous or not) in place.
void scale_rows_(const Tensor& grad, const RowScale& scale, cudaStream_t stream) {
  if (grad.numel() == 0) return;
  Tensor g = grad.is_contiguous() ? grad : grad.contiguous();
  const int64_t B = g.size(0), D = g.numel() / B;
  AT_DISPATCH_SWITCH(g.scalar_type(), "vaekern scale_rows_",
                     AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, [&] {
                       const Tiling t = tiling(B, D, 16 / sizeof(scalar_t));
                       scale_rows_kernel<scalar_t><<<blocks_for(B * t.tiles_per_row * t.G), kThreads, 0, stream>>>(
                           g.data_ptr<scalar_t>(), scale, B, D, t.tile_len, t.tiles_per_row, t.G);
                       C10_CUDA_KERNEL_LAUNCH_CHECK();
                     }));
  if (!g.is_same(grad)) grad.copy_(g);
}

std::tuple<Tensor, Tensor> bernoulli_nll_cuda(const Tensor& input, const Tensor& target, bool from_logits,
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
  const int64_t B = x.B, D = x.D;
  const auto acc = acc_scalar(input.scalar_type());
  Tensor out = at::empty(loss_shape(reduction, B), input.options().dtype(acc));
  Tensor grad = compute_grad ? at::empty(input.sizes(), input.options()) : at::empty({0}, input.options());
  if (B == 0 && reduction == 0) return {out, grad};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bernoulli_nll_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const Tiling tl = tiling(B, D, recon_vec<scalar_t, acc_t>());
    // With one tile per row and no reduction, the tile sums are the output.
    const bool direct = reduction == 0 && tl.tiles_per_row == 1;
    Tensor partials = direct ? out : at::empty({B * tl.tiles_per_row}, out.options());
    const ReconArgs<scalar_t, acc_t> a{x.t.data_ptr<scalar_t>(),
                                       t.t.data_ptr(),
                                       compute_grad ? grad.data_ptr<scalar_t>() : nullptr,
                                       x.row_stride,
                                       t.row_stride,
                                       D,
                                       tl.tile_len,
                                       kind_of(target.scalar_type()),
                                       reduction == 1 ? acc_t(1) / static_cast<acc_t>(B) : acc_t(1)};
    if (B > 0) {
      const unsigned blocks = blocks_for(B * tl.tiles_per_row * tl.G);
      if (from_logits) {
        bernoulli_nll_fwd_kernel<true><<<blocks, kThreads, 0, stream>>>(a, partials.data_ptr<acc_t>(), B,
                                                                         tl.tiles_per_row, tl.G);
      } else {
        bernoulli_nll_fwd_kernel<false><<<blocks, kThreads, 0, stream>>>(a, partials.data_ptr<acc_t>(), B,
                                                                          tl.tiles_per_row, tl.G);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!direct) {
      reduce_partials<acc_t>(partials, tl.tiles_per_row, Tensor(), 0, B, reduction, Tensor(), out, Tensor(),
                             Tensor(), stream);
    }
  });
  return {out, grad};
}

void bernoulli_nll_backward__cuda(const Tensor& grad_input, const Tensor& grad_out) {
  check_cuda(grad_input, "grad_input", grad_input);
  check_float(grad_input, "grad_input");
  TORCH_CHECK(grad_input.dim() >= 1, "vaekern (cuda): grad_input must have a batch dim");
  const c10::cuda::CUDAGuard guard(grad_input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t stride = 0;
  const Tensor go = scale_operand(grad_out, grad_input, grad_input.size(0), "grad_out", &stride);
  const RowScale scale{go.data_ptr(), nullptr, nullptr, stride, 0, kind_of(go.scalar_type()), kF32, kF32, 1.0};
  scale_rows_(grad_input, scale, stream);
}

TORCH_LIBRARY_IMPL(vaekern, CUDA, m) {
  m.impl("bernoulli_nll", &bernoulli_nll_cuda);
  m.impl("bernoulli_nll_backward_", &bernoulli_nll_backward__cuda);
}

}  // namespace cuda
}  // namespace vaekern
