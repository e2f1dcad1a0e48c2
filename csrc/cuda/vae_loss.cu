// vae_loss and vae_loss_backward_ on CUDA: the negative ELBO of a Bernoulli-decoder VAE.
//
// Math (the likelihood's element functor: BernoulliNll, GaussianNll with its per-column
// log_scale, or ContinuousBernoulliNll, by `likelihood`; and kl.cuh): per row b,
//   recon_b = sum_j nll(recon[b, j], target[b, j]),  kl_b = sum_k kl(mu[b, k], logvar[b, k])
//   (the KL to the prior, which kl.cuh takes to N(0, I) on load)
//   loss = R(recon) + beta * R(kl), with R the reduction over rows (none, mean, sum);
//   with free bits lambda (mean or sum only) the KL term is instead that of the column sums
//   S_j of the KL over the rows: sum_j where(S_j / B < lambda, lambda, S_j / B), times B for
//   sum, and kl_weight[j] = 0 where lambda holds column j (or is NaN), else 1.
// Backward, for upstream gradients gL (loss), gR (recon term), gK (kl term):
//   grad_recon[b] = (gL + gR)_b * d R(recon) / d recon[b]   (the gradient saved by forward)
//   grad_mu, grad_logvar (and the prior's, per element) = gaussian_kl's gradients for the
//   scale gL * beta + gK (/ B for mean), or 0 for latent column j where kl_weight[j] is 0
//   under free bits (whatever the scale, as the oracle's where)
//
// Forward is one stage-1 launch: row b has tiles_per_row reconstruction tiles plus
// kl_tiles latent tiles, each summed by one group of lanes (likelihood_tile of
// likelihood.cuh, kl_tile_wide of kl.cuh), so a single pass covers the pixels and the
// latents; the gradient of the reduced reconstruction term (upstream 1) is written on the
// way. Stage 2 (reduce_partials.cuh) reduces both streams of partials in a fixed order and
// forms loss = recon + beta * kl with beta read on the device. The kernel is templated on
// the likelihood's element functor, as likelihood.cuh describes. Under free bits stage 1 has
// no latent tiles: gaussian_kl's column kernel (kl.cu) writes the column sums in between,
// and stage 2 applies lambda to them.
// The KL's mu^2 and its sums are double whatever the loss dtype (kl_tile_wide; under free bits
// the column sums are in the latents' accumulation type, as gaussian_kl's), and the loss
// is formed from them in double, then rounded, as the float64 oracle forms it: for finite
// float32 latents the KL is then finite (mu^2 <= 1.2e77), so beta = 0 leaves the recon term
// where a float KL beyond its range made the loss 0 * inf = NaN. Skipping the product at
// beta = 0 would also drop a KL that is infinite in the oracle too (an infinite latent),
// whose loss is NaN there. The rest of a KL element stays in the accumulation type; the KL
// part is the KL rounded to the loss dtype (inf beyond its range).
// Backward scales the saved gradient in place (scale_likelihood_rows_, likelihood.cuh; rows
// whose factor is exactly 1 are left untouched, float16 elements that overflowed or lost
// bits in forward are recomputed from recon and target) and computes the latent gradients
// (gaussian_kl_grads, kl.cu).
//
// Dtypes: recon float16, bfloat16, float32, float64; target any float dtype, bool or uint8;
// mu and logvar any float dtype (both the same), independently of recon. Accumulation and
// the losses are float64 if any of recon, mu, logvar is float64, else float32 (the KL's
// square and sums double, above).
// Limits: misaligned reconstruction rows take scalar loads; latents always do.
#include "bernoulli_nll.cuh"
#include "continuous_bernoulli_nll.cuh"
#include "gaussian_nll.cuh"
#include "kl.cuh"
#include "likelihood.cuh"
#include "reduce_partials.cuh"
#include "row_scale.cuh"

namespace vaekern {
namespace cuda {
namespace {

struct LatentArgs {
  const void* mu;  // [B, Dz] latents of kind `kind`, rows mu_stride apart
  const void* lv;  // [B, Dz] same kind, rows lv_stride apart
  int64_t mu_stride, lv_stride, D, tile_len;
  int kind;
  KlPrior prior;
};

template <typename lat_t, typename acc_t>
__device__ __forceinline__ double latent_tile_as(const LatentArgs& l, int64_t b, int64_t start, int64_t end, int sub,
                                                 int G) {
  return kl_tile_wide<lat_t, acc_t>(static_cast<const lat_t*>(l.mu) + b * l.mu_stride,
                                    static_cast<const lat_t*>(l.lv) + b * l.lv_stride, l.prior, b, start, end, sub, G);
}

// The KL of latents [start, start + tile_len) of row b, in double (the header says why).
template <typename acc_t>
__device__ __forceinline__ double latent_tile(const LatentArgs& l, int64_t b, int64_t start, int sub, int G) {
  const int64_t end = min(start + l.tile_len, l.D);
  switch (l.kind) {
    case kF16: return latent_tile_as<at::Half, acc_t>(l, b, start, end, sub, G);
    case kBF16: return latent_tile_as<at::BFloat16, acc_t>(l, b, start, end, sub, G);
    case kF64:
      // float64 latents make the accumulation float64 (the host checks), so no float
      // instance needs this case.
      if constexpr (std::is_same_v<acc_t, double>) return latent_tile_as<double, acc_t>(l, b, start, end, sub, G);
      return 0.0;
    default: return latent_tile_as<float, acc_t>(l, b, start, end, sub, G);
  }
}

// Blocks per SM that the fused forward asks for: kFwdMinBlocks (at most 64 registers), or 2
// (128) for the likelihoods after the Bernoulli in double math, whose L' (continuous
// Bernoulli) or per-column parameter (Gaussian) beside the KL tile spilled 16-44 bytes at
// 64 registers (sm_80 and sm_90). The Bernoulli's kernels stay as they were.
template <typename Elem, typename acc_t>
constexpr int fwd_min_blocks() {
  constexpr bool bernoulli = std::is_same_v<Elem, BernoulliNll<true>> || std::is_same_v<Elem, BernoulliNll<false>>;
  return sizeof(acc_t) == 8 && !bernoulli ? 2 : kFwdMinBlocks;
}

template <typename Elem, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, fwd_min_blocks<Elem, acc_t>())
    vae_loss_fwd_kernel(LikelihoodArgs<scalar_t, acc_t> a, LatentArgs l,
                        acc_t* __restrict__ recon_partials,  // [B, tiles_per_row]
                        double* __restrict__ kl_partials,    // [B, kl_tiles]
                        int64_t B, int64_t tiles_per_row, int64_t kl_tiles, int G) {
  const GroupPos pos = group_pos(G);
  const int64_t per_row = tiles_per_row + kl_tiles;
  const int64_t ntiles = B * per_row;
  for (int64_t first = pos.first; first < ntiles; first += pos.stride) {
    const int64_t tile = first + pos.group;
    acc_t v = 0;
    double kl = 0;
    int64_t b = 0, j = 0;
    if (tile < ntiles) {
      b = tile / per_row;
      j = tile - b * per_row;
      if (j < tiles_per_row) {
        v = likelihood_tile<Elem>(a, b, j * a.tile_len, pos.sub, G);
      } else {
        kl = latent_tile<acc_t>(l, b, (j - tiles_per_row) * l.tile_len, pos.sub, G);
      }
    }
    // After the branches: every lane of the warp takes part (a group's other sum is 0).
    v = group_sum(v, G);
    kl = group_sum(kl, G);
    if (pos.sub == 0 && tile < ntiles) {
      if (j < tiles_per_row) {
        recon_partials[b * tiles_per_row + j] = v;
      } else {
        kl_partials[b * kl_tiles + (j - tiles_per_row)] = kl;
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void vae_loss_launch(const Rows& x, const Rows& t, at::ScalarType target_dtype, const Rows& m, const Rows& lv,
                     at::ScalarType latent_dtype, const KlPrior& prior, const Tensor& free_bits, const Tensor& beta,
                     const Tensor& log_scale, int64_t likelihood, bool from_logits, int64_t reduction,
                     const Tensor& grad, const Tensor& loss, const Tensor& rec, const Tensor& kl,
                     const Tensor& weight, cudaStream_t stream) {
  const int64_t B = x.B;
  const Tiling tl = tiling(B, x.D, likelihood_vec<scalar_t, acc_t>(), m.D);
  const int G = tl.G;
  const int64_t tile_len = tl.tile_len, tiles = tl.tiles_per_row;
  const int64_t kl_len = kl_tile_len(G);
  const bool free = free_bits.defined();
  const int64_t kl_tiles = free ? 0 : std::max<int64_t>(1, ceil_div(m.D, kl_len));
  Tensor recon_partials = at::empty({B * tiles}, loss.options());
  Tensor kl_partials = at::empty({B * kl_tiles}, loss.options().dtype(at::kDouble));
  const LikelihoodArgs<scalar_t, acc_t> a{x.tensor.data_ptr<scalar_t>(),
                                          t.tensor.data_ptr(),
                                          grad.numel() > 0 ? grad.data_ptr<scalar_t>() : nullptr,
                                          x.row_stride,
                                          t.row_stride,
                                          x.D,
                                          tile_len,
                                          kind_of(target_dtype),
                                          reduction == 1 ? acc_t(1) / static_cast<acc_t>(B) : acc_t(1)};
  const LatentArgs l{m.tensor.data_ptr(), lv.tensor.data_ptr(), m.row_stride, lv.row_stride, m.D, kl_len,
                     kind_of(latent_dtype), prior};
  if (B > 0) {
    const unsigned blocks = blocks_for(B * (tiles + kl_tiles) * G);
    acc_t* recon_out = recon_partials.data_ptr<acc_t>();
    double* kl_out = kl_partials.data_ptr<double>();
    auto launch = [&](auto elem) {
      using Elem = decltype(elem);
      LikelihoodArgs<scalar_t, acc_t> args = a;
      args.param = column_param_of<Elem, acc_t>(Elem::kColumnParam ? log_scale : Tensor());
      vae_loss_fwd_kernel<Elem><<<blocks, kThreads, 0, stream>>>(args, l, recon_out, kl_out, B, tiles, kl_tiles, G);
    };
    switch (likelihood) {
      case 1: launch(GaussianNll{}); break;
      case 2: from_logits ? launch(ContinuousBernoulliNll<true>{}) : launch(ContinuousBernoulliNll<false>{}); break;
      default: from_logits ? launch(BernoulliNll<true>{}) : launch(BernoulliNll<false>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (free) {
    const Tensor sums = at::empty({m.D}, loss.options().dtype(at::kDouble));
    gaussian_kl_columns(m, lv, latent_dtype, prior, sums, stream);
    reduce_partials<acc_t, double>(recon_partials, tiles, sums, m.D, B, reduction, beta, rec, kl, loss, stream,
                                   free_bits, weight);
    return;
  }
  reduce_partials<acc_t, double>(recon_partials, tiles, kl_partials, kl_tiles, B, reduction, beta, rec, kl, loss,
                                 stream);
}

// vae_loss's likelihood (vaekern/_ops/_common.py LIKELIHOODS).
void check_likelihood(int64_t likelihood) {
  TORCH_CHECK(likelihood >= 0 && likelihood <= 2,
              "vaekern (cuda): likelihood must be 0 (bernoulli), 1 (gaussian) or 2 (continuous_bernoulli), got ",
              likelihood);
}

void check_beta(const Tensor& beta, const Tensor& like) {
  check_cuda(beta, "beta", like);
  check_float(beta, "beta");
  TORCH_CHECK(beta.numel() == 1, "vaekern (cuda): beta must be a 0-d tensor, got shape ", beta.sizes());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> vae_loss_cuda(
    const Tensor& recon, const Tensor& target, const Tensor& mu, const Tensor& logvar,
    const std::optional<Tensor>& prior_mu, const std::optional<Tensor>& prior_logvar,
    const std::optional<Tensor>& free_bits, const Tensor& beta, const Tensor& log_scale, int64_t likelihood,
    bool from_logits, int64_t reduction, bool compute_grad) {
  check_cuda(recon, "recon", recon);
  check_cuda(target, "target", recon);
  check_float(recon, "recon");
  kind_of(target.scalar_type());
  TORCH_CHECK(recon.sizes() == target.sizes(), "vaekern (cuda): target has shape ", target.sizes(),
              " but recon has shape ", recon.sizes());
  check_latents(mu, logvar, recon);
  const KlPriorViews prior = kl_prior(prior_mu, prior_logvar, mu);
  check_beta(beta, recon);
  check_reduction(reduction);
  check_likelihood(likelihood);
  if (free_bits.has_value()) {
    check_cuda(*free_bits, "free_bits", recon);
    check_float(*free_bits, "free_bits");
    TORCH_CHECK(reduction != 0 && free_bits->dim() == 0,
                "vaekern (cuda): free_bits must be 0-d, with reduction 1 (mean) or 2 (sum): they are a batch quantity; "
                "got shape ", free_bits->sizes(), " with reduction ", reduction);
  }
  const c10::cuda::CUDAGuard guard(recon.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const Rows x = as_rows(recon), t = as_rows(target), m = as_rows(mu), l = as_rows(logvar);
  TORCH_CHECK(m.B == x.B, "vaekern (cuda): mu has batch size ", m.B, " but recon has batch size ", x.B);
  const bool dbl = recon.scalar_type() == at::kDouble || mu.scalar_type() == at::kDouble;
  // The Gaussian's log_scale is in the loss dtype: the recon term's math is (double beside
  // float64 latents).
  if (likelihood == 1) check_log_scale(log_scale, recon, dbl ? at::kDouble : at::kFloat, x.D);
  const auto opts = recon.options().dtype(dbl ? at::kDouble : at::kFloat);
  const std::vector<int64_t> shape = loss_shape(reduction, x.B);
  Tensor loss = at::empty(shape, opts), rec = at::empty(shape, opts), kl = at::empty(shape, opts);
  Tensor grad = compute_grad ? at::empty(recon.sizes(), recon.options()) : at::empty({0}, recon.options());
  Tensor weight = at::empty(free_bits.has_value() ? mu.sizes().slice(1) : at::IntArrayRef{0}, opts);
  if (x.B == 0 && reduction == 0) return {loss, rec, kl, grad, weight};
  const Tensor fb = free_bits.value_or(Tensor());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, recon.scalar_type(), "vae_loss_cuda", [&] {
    if (dbl) {
      vae_loss_launch<scalar_t, double>(x, t, target.scalar_type(), m, l, mu.scalar_type(), prior.operand(), fb, beta,
                                        log_scale, likelihood, from_logits, reduction, grad, loss, rec, kl, weight,
                                        stream);
    } else if constexpr (!std::is_same_v<scalar_t, double>) {
      vae_loss_launch<scalar_t, float>(x, t, target.scalar_type(), m, l, mu.scalar_type(), prior.operand(), fb, beta,
                                       log_scale, likelihood, from_logits, reduction, grad, loss, rec, kl, weight,
                                       stream);
    }
  });
  return {loss, rec, kl, grad, weight};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> vae_loss_backward_cuda(
    const Tensor& grad_recon, const Tensor& grad_loss, const Tensor& grad_recon_term, const Tensor& grad_kl_term,
    const Tensor& recon, const Tensor& target, const Tensor& log_scale, const Tensor& mu, const Tensor& logvar,
    const std::optional<Tensor>& prior_mu, const std::optional<Tensor>& prior_logvar,
    const std::optional<Tensor>& kl_weight, const Tensor& beta, int64_t likelihood, bool from_logits,
    int64_t reduction) {
  check_latents(mu, logvar, mu);
  const KlPriorViews prior = kl_prior(prior_mu, prior_logvar, mu);  // checked before grad_recon is written
  Tensor weight;
  if (kl_weight.has_value()) {
    check_cuda(*kl_weight, "kl_weight", mu);
    TORCH_CHECK(reduction != 0 && kl_weight->sizes() == mu.sizes().slice(1), "vaekern (cuda): kl_weight must have shape ",
                mu.sizes().slice(1), " (mu.shape[1:]) with reduction 1 or 2, got ", kl_weight->sizes(),
                " with reduction ", reduction);
    TORCH_CHECK(kl_weight->scalar_type() == at::kFloat || kl_weight->scalar_type() == at::kDouble,
                "vaekern (cuda): kl_weight must be float32 or float64, got ", kl_weight->scalar_type());
    weight = kl_weight->contiguous();
    TORCH_CHECK(grad_loss.dim() == 0 && grad_kl_term.dim() == 0,
                "vaekern (cuda): grad_loss and grad_kl_term must be 0-d with kl_weight (a mean or sum loss)");
  }
  check_beta(beta, mu);
  check_reduction(reduction);
  check_likelihood(likelihood);
  const c10::cuda::CUDAGuard guard(mu.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = mu.size(0);
  int64_t loss_stride = 0, recon_stride = 0, kl_stride = 0;
  const Tensor loss_g = scale_operand(grad_loss, mu, B, "grad_loss", &loss_stride);
  const Tensor recon_g = scale_operand(grad_recon_term, mu, B, "grad_recon_term", &recon_stride);
  const Tensor kl_g = scale_operand(grad_kl_term, mu, B, "grad_kl_term", &kl_stride);
  if (grad_recon.numel() > 0) {
    check_cuda(grad_recon, "grad_recon", mu);
    check_float(grad_recon, "grad_recon");
    TORCH_CHECK(grad_recon.size(0) == B, "vaekern (cuda): grad_recon has batch size ", grad_recon.size(0),
                " but mu has batch size ", B);
    // The saved gradient already holds d R(recon) / d recon: scale row b by gL_b + gR_b.
    const RowScale recon_scale{.grad_loss = loss_g.data_ptr(),
                               .grad_term = recon_g.data_ptr(),
                               .grad_loss_stride = loss_stride,
                               .grad_term_stride = recon_stride,
                               .grad_loss_kind = kind_of(loss_g.scalar_type()),
                               .grad_term_kind = kind_of(recon_g.scalar_type())};
    const double grad_scale = reduction == 1 ? 1.0 / static_cast<double>(B) : 1.0;
    auto scale = [&](auto elem, const Tensor& param) {
      scale_likelihood_rows_<decltype(elem)>(grad_recon, recon_scale, recon, target, grad_scale, stream, param);
    };
    switch (likelihood) {
      // Only the float16 recompute reads log_scale, in float (float16's arithmetic type),
      // while the forward took it in the loss dtype (double beside float64 latents).
      case 1: scale(GaussianNll{}, log_scale.to(at::kFloat)); break;
      case 2:
        from_logits ? scale(ContinuousBernoulliNll<true>{}, Tensor()) : scale(ContinuousBernoulliNll<false>{}, Tensor());
        break;
      default: from_logits ? scale(BernoulliNll<true>{}, Tensor()) : scale(BernoulliNll<false>{}, Tensor());
    }
  }
  const RowScale kl_scale{.grad_loss = loss_g.data_ptr(),
                          .beta = beta.data_ptr(),
                          .grad_term = kl_g.data_ptr(),
                          .grad_loss_stride = loss_stride,
                          .grad_term_stride = kl_stride,
                          .grad_loss_kind = kind_of(loss_g.scalar_type()),
                          .beta_kind = kind_of(beta.scalar_type()),
                          .grad_term_kind = kind_of(kl_g.scalar_type()),
                          .divisor = reduction == 1 ? static_cast<double>(B) : 1.0,
                          .weight = weight.defined() ? weight.data_ptr() : nullptr,
                          .weight_kind = weight.defined() ? kind_of(weight.scalar_type()) : kF32};
  // Under free bits the (0-d) upstreams are read at every column: 0 where its weight is 0 (RowScale).
  return gaussian_kl_grads(mu, logvar, prior, kl_scale, /*per_column=*/weight.defined(), stream);
}

TORCH_LIBRARY_IMPL(vaekern, CUDA, m) {
  m.impl("vae_loss", &vae_loss_cuda);
  m.impl("vae_loss_backward_", &vae_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace vaekern
