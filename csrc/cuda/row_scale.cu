// scale_rows_ (row_scale.cuh): g[b, :] *= s_b in place, for the backward of every op that
// saves its gradient in forward (bernoulli_nll_backward_, vae_loss_backward_).
//
// One pass over the tiles of common.cuh's tiling; a group whose s_b is exactly 1 returns
// without touching g. The product is formed in float (double for double) and rounded once
// to g's dtype.
//
// Dtypes: g float16, bfloat16, float32 or float64; the scales' operands float or double.
// Limits: rows of g that are not 16-byte aligned use scalar loads; a non-contiguous g is
// scaled in a contiguous copy and copied back.
#include "row_scale.cuh"

namespace vaekern {
namespace cuda {
namespace {

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

}  // namespace cuda
}  // namespace vaekern
