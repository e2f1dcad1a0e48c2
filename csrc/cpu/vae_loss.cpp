// vae_loss on CPU: the negative ELBO, recon + beta * kl, in one call.
//
// The reconstruction term is the likelihood's NLL (bernoulli_nll, gaussian_nll or
// continuous_bernoulli_nll by `likelihood`, with its gradient computed in the same pass) and
// the KL term gaussian_kl; see those files for the math. Both run the shared term code
// (likelihood.h with the likelihood's element function, kl.h). Per row b:
//   loss_b = recon_b + beta * kl_b;  for mean/sum both terms are reduced first.
// With free bits lambda (mean or sum only), the KL term is that of the column sums S_j
// (gaussian_kl_columns, each latent element's KL over the batch):
//   kl = sum_j where(S_j / B < lambda, lambda, S_j / B), times B for sum,
// and kl_weight[j] = 0 where lambda holds element j (or is NaN), else 1.
// Backward (vae_loss_backward_):
//   d/d recon = saved gradient * (g_loss + g_recon_term)   (rows whose factor is 1 skipped;
//               float16 elements that overflowed or lost bits recomputed, see row_ops.h)
//   d/d mu, d/d logvar (and the prior's parts, per element) = gaussian_kl gradients *
//               (g_loss * beta + g_kl_term) (/ B for mean); under free bits 0 for
//               latent element j where kl_weight[j] is 0 (whatever the scale)
//
// dtypes: as bernoulli_nll and gaussian_kl; the loss dtype is float64 if any of recon, mu,
// logvar is float64, else float32. The recon term is computed in the loss dtype (float32
// recon beside float64 latents in double), and so is the KL, but with mu^2 and its sums in
// double (see vae_loss_cpu; under free bits the column sums are in the latents' arithmetic
// type, as gaussian_kl's, and lambda and their means in double); the loss is formed in
// double, then rounded to the loss dtype.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/allocation.h"
#include "cpu/checks.h"
#include "cpu/kl.h"
#include "cpu/likelihood.h"
#include "cpu/row_ops.h"

namespace vaekern::cpu {
namespace {

// The Kernels entries of vae_loss's likelihood (vaekern/_ops/_common.py LIKELIHOODS), and
// whether it reads log_scale.
struct Likelihood {
  LikelihoodKernel forward;
  ScaleRowsKernel scale_rows;
  bool takes_log_scale;
};

Likelihood likelihood_of(int64_t likelihood, bool from_logits) {
  const Kernels& k = kernels();
  switch (likelihood) {
    case 0: return {k.bernoulli_nll[from_logits], k.bernoulli_nll_scale_rows[from_logits], false};
    case 1: return {k.gaussian_nll, k.gaussian_nll_scale_rows, true};
    case 2:
      return {k.continuous_bernoulli_nll[from_logits], k.continuous_bernoulli_nll_scale_rows[from_logits], false};
    default:
      TORCH_CHECK(false, "vaekern (cpu): likelihood must be 0 (bernoulli), 1 (gaussian) or 2 (continuous_bernoulli), "
                  "got ", likelihood);
  }
}

double scalar_value(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, "vaekern (cpu): ", name, " must have one element, got shape ", t.sizes());
  return row_values(t, 1, name)[0];
}

// The free-bits KL term (the header's) of the latents, in double and in column order,
// reduced as `reduction` (1 mean, 2 sum) says; writes the weights into `weight` (mu's
// shape[1:], float or double). Over no rows the means are 0/0: NaN, as the oracle's.
double free_bits_kl(const at::Tensor& mu, const at::Tensor& logvar, const KlPrior& prior, double lambda,
                    int64_t reduction, at::Tensor& weight) {
  const std::vector<double> sums = gaussian_kl_columns(mu, logvar, prior);
  const double rows = static_cast<double>(mu.size(0));
  double term = 0;
  auto fill = [&](auto* w) {
    for (size_t j = 0; j < sums.size(); ++j) {
      const double per = sums[j] / rows;
      const bool held = per < lambda || std::isnan(lambda);
      w[j] = held ? 0 : 1;
      term += held ? lambda : per;
    }
  };
  if (weight.scalar_type() == at::kDouble) fill(weight.mutable_data_ptr<double>()); else fill(weight.mutable_data_ptr<float>());
  return reduction == 2 ? term * rows : term;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_cpu(
    const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
    const std::optional<at::Tensor>& free_bits, const at::Tensor& beta, const at::Tensor& log_scale,
    int64_t likelihood, bool from_logits, int64_t reduction, bool compute_grad) {
  check_float(recon, "recon");
  check_target(target, recon);
  check_latents(mu, logvar);
  check_reduction(reduction);
  const int64_t rows = recon.size(0);
  TORCH_CHECK(mu.size(0) == rows, "vaekern (cpu): mu has batch size ", mu.size(0), " but recon has batch size ", rows);
  const double b = scalar_value(beta, "beta");
  const c10::ScalarType dt = acc_dtype({&recon, &mu, &logvar});
  const Likelihood lik = likelihood_of(likelihood, from_logits);
  if (lik.takes_log_scale) check_column_param(log_scale, recon, dt, "log_scale");
  const KlPrior prior = kl_prior(prior_mu, prior_logvar, mu);
  TORCH_CHECK(!free_bits.has_value() || (reduction != 0 && free_bits->dim() == 0),
              "vaekern (cpu): free_bits must be 0-d, with reduction 1 (mean) or 2 (sum): they are a batch quantity; "
              "got shape ", free_bits.has_value() ? free_bits->sizes() : at::IntArrayRef{}, " with reduction ", reduction);
  at::Tensor weight = at::empty(free_bits.has_value() ? mu.sizes().slice(1) : at::IntArrayRef{0},
                                recon.options().dtype(dt));

  at::Tensor grad = compute_grad ? empty_output(recon.sizes(), recon.options()) : recon.new_empty({0});
  const double grad_scale = reduction == 1 ? 1.0 / static_cast<double>(rows) : 1.0;
  // The recon term in the loss's dtype: float32 recon beside float64 latents gives a
  // float64 loss, in which a term beyond float's range is finite.
  const std::vector<double> rec = likelihood_rows(lik.forward, recon, target, grad_scale,
                                                  compute_grad ? grad : at::Tensor(), dt,
                                                  lik.takes_log_scale ? log_scale : at::Tensor());
  // The KL in the loss's dtype, but mu^2 and its sums in double whatever that is, as in the
  // oracle (float64): for finite float32 latents the KL is then finite (mu^2 <= 1.2e77),
  // and beta = 0 leaves the recon term, where a float KL beyond float's range made the
  // loss 0 * inf = NaN. Skipping the product at beta = 0 instead would also drop a KL that
  // is infinite in the oracle too (an infinite latent), whose loss is NaN there. The loss
  // is formed in double and rounded to dt, like the KL part: inf where the KL is beyond
  // dt's range. Only the square and the sums are double: the exp stays in float.
  // Under free bits the KL is by columns instead (the header's; in the latents' arithmetic
  // type, as gaussian_kl's free bits).
  if (free_bits.has_value()) {
    const double kl = free_bits_kl(mu, logvar, prior, scalar_value(*free_bits, "free_bits"), reduction, weight);
    const std::vector<double> loss = {reduced_value(rec, reduction) + b * kl};
    return {reduce_rows(loss, 2, dt), reduce_rows(rec, reduction, dt), reduce_rows({kl}, 2, dt), grad, weight};
  }
  const std::vector<double> kl = gaussian_kl_rows(mu, logvar, prior, dt, true);

  at::Tensor rec_t = reduce_rows(rec, reduction, dt);
  at::Tensor kl_t = reduce_rows(kl, reduction, dt);
  std::vector<double> loss;
  if (reduction == 0) {
    loss.resize(rows);
    for (int64_t i = 0; i < rows; ++i) loss[i] = rec[i] + b * kl[i];
  } else {
    loss = {reduced_value(rec, reduction) + b * reduced_value(kl, reduction)};
  }
  at::Tensor loss_t = reduce_rows(loss, reduction == 0 ? 0 : 2, dt);
  return {loss_t, rec_t, kl_t, grad, weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_backward_cpu(
    const at::Tensor& grad_recon, const at::Tensor& grad_loss, const at::Tensor& grad_recon_term,
    const at::Tensor& grad_kl_term, const at::Tensor& recon, const at::Tensor& target, const at::Tensor& log_scale,
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
    const std::optional<at::Tensor>& prior_logvar, const std::optional<at::Tensor>& kl_weight, const at::Tensor& beta,
    int64_t likelihood, bool from_logits, int64_t reduction) {
  check_latents(mu, logvar);
  check_reduction(reduction);
  const KlPrior prior = kl_prior(prior_mu, prior_logvar, mu);  // checked before grad_recon is written
  const int64_t rows = mu.size(0);
  std::vector<double> weight;
  if (kl_weight.has_value()) {
    TORCH_CHECK(reduction != 0 && kl_weight->sizes() == mu.sizes().slice(1), "vaekern (cpu): kl_weight must have shape ",
                mu.sizes().slice(1), " (mu.shape[1:]) with reduction 1 or 2, got ", kl_weight->sizes(),
                " with reduction ", reduction);
    weight = row_values(kl_weight->reshape({-1}), kl_weight->numel(), "kl_weight");
    TORCH_CHECK(grad_loss.numel() == 1 && grad_kl_term.numel() == 1,
                "vaekern (cpu): grad_loss and grad_kl_term must be 0-d with kl_weight (a mean or sum loss)");
  }
  const std::vector<double> gl = row_values(grad_loss, rows, "grad_loss");
  const std::vector<double> gr = row_values(grad_recon_term, rows, "grad_recon_term");
  const std::vector<double> gk = row_values(grad_kl_term, rows, "grad_kl_term");
  const double b = scalar_value(beta, "beta");
  // The recon factor is added in the upstream gradients' dtype, as autograd would.
  const bool f32 = grad_loss.scalar_type() != at::kDouble && grad_recon_term.scalar_type() != at::kDouble;
  std::vector<double> recon_scale(rows), kl_scale(rows);
  for (int64_t i = 0; i < rows; ++i) {
    recon_scale[i] = f32 ? static_cast<double>(static_cast<float>(gl[i]) + static_cast<float>(gr[i])) : gl[i] + gr[i];
    kl_scale[i] = (gl[i] * b + gk[i]) / (reduction == 1 ? static_cast<double>(rows) : 1.0);
  }
  if (grad_recon.numel() != 0) {
    TORCH_CHECK(grad_recon.size(0) == rows, "vaekern (cpu): grad_recon has batch size ", grad_recon.size(0),
                " but mu has batch size ", rows);
    const Likelihood lik = likelihood_of(likelihood, from_logits);
    // Only the float16 recompute reads log_scale, in float (float16's arithmetic type),
    // while the forward took it in the loss dtype (double beside float64 latents).
    at::Tensor param;
    if (lik.takes_log_scale && grad_recon.scalar_type() == at::kHalf) param = log_scale.to(at::kFloat);
    scale_rows_(lik.scale_rows, grad_recon, recon_scale, recon, target,
                reduction == 1 ? 1.0 / static_cast<double>(rows) : 1.0, param);
  }
  if (kl_weight.has_value()) {  // the one scale, or 0 where the free bits hold the element
    // Every row's scale is the same (the upstreams of a mean or sum are 0-d); no rows, no latents.
    const double s = rows > 0 ? kl_scale[0] : 0.0;
    for (double& w : weight) w = w != 0 ? s : 0.0;  // a held element: 0 whatever s, as the oracle's where
    return gaussian_kl_grads(weight, /*per_column=*/true, mu, logvar, prior);
  }
  return gaussian_kl_grads(kl_scale, /*per_column=*/false, mu, logvar, prior);
}

}  // namespace

TORCH_LIBRARY_IMPL(vaekern, CPU, m) {
  m.impl("vae_loss", &vae_loss_cpu);
  m.impl("vae_loss_backward_", &vae_loss_backward_cpu);
}

}  // namespace vaekern::cpu
