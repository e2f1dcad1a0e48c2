// Autograd for the extension's ops, in C++: the lean path of the cpu and cuda backends.
//
// The schemas, fakes and the Python autograd of vaekern/_ops/<op>.py serve every other
// namespace (Triton's, the tests' emulated CUDA). Here the same two paths are written once
// more, in C++, because a step on small tensors is all host overhead: forward+backward of
// vae_loss on 1x1 CPU tensors took about 75 us through a Python autograd.Function and takes
// about 51 us through this, against 111-127 us for the eager pytorch/examples loss (CPU
// time, Intel Xeon, 1 thread, torch 2.14.1; the overhead benchmark: 54 us against 125 us).
// vaekern.backends registers the namespace's Python fakes but no Python autograd when it
// finds these kernels at the Autograd key.
//
// Math and saved tensors: as in vaekern/_ops/<op>.py, whose headers state them.
//
// * the likelihood ops (bernoulli_nll, continuous_bernoulli_nll, gaussian_nll), vae_loss:
//   forward also returns the reconstruction gradient for an
//   upstream gradient of 1 (folded 1/B for "mean"). The first backward takes it (so a
//   second one, retain_graph=True, recomputes it) and scales it per row by the upstream
//   gradient: in place, with the kernels' skip of rows scaled by exactly 1, so a plain
//   loss.backward() moves no image-sized bytes; or out of place where someone else holds
//   the buffer, or while AOTAutograd traces (torch.compile, opcheck), whose partitioner
//   cannot take an in-place update of a saved forward output (scale_in_place). Either way
//   a float16 element out of float16's normal range (overflowed, or a subnormal that lost
//   bits) is recomputed by the backward kernel from the saved input and target. Double
//   backward through the reconstruction raises: the saved gradient has no graph. vae_loss
//   whose recon needs no gradient supports it: the latents' gradient is then the KL's, in
//   differentiable ATen ops (differentiable_kl_grads); so does gaussian_nll through a learned
//   log_scale. The likelihood picks the backward kernel (scale_likelihood_rows), and a
//   learned Gaussian log_scale gets its formula (log_scale_grad), which for a 0-d one reads
//   the saved loss (the recon term in vae_loss): saved only then (loss_read_by_backward).
// * gaussian_kl, reparameterize: backward calls the backward kernel, or, when it must
//   build a graph (create_graph=True), the same formula in differentiable ATen ops.
// * Every op: a call that builds no graph (no_grad, or no input requiring grad) calls the
//   kernel directly, without the Function (builds_graph).
#include <ATen/TensorOperators.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/expm1.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "conventions.h"  // kLogvarMax, kHalfLog2Pi, kKlColumns

namespace vaekern::autograd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using BernoulliNLLSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, bool, int64_t, bool);
using ScaleRowsSig = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, int64_t);
using OptionalTensor = std::optional<Tensor>;
using GaussianKLSig = Tensor(const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, int64_t);
using KLGradsSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const OptionalTensor&, const OptionalTensor&, int64_t);
using ReparameterizeSig = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                 const std::optional<Tensor>&);
using ReparameterizeBackwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                             const std::optional<Tensor>&,
                                                             const std::optional<Tensor>&);
using GaussianNLLSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, bool);
using ScaleGaussianRowsSig = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t);
using VAELossSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, const Tensor&, const Tensor&, int64_t, bool, int64_t, bool);
using VAELossBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
    int64_t, bool, int64_t);

// The kernel op `vaekern::<name>`, looked up on first use: the schemas are defined in
// Python after this library is loaded.
template <class Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

#define VAEKERN_KERNEL(fn, Sig, name)                          \
  const c10::TypedOperatorHandle<Sig>& fn() {                  \
    static const c10::TypedOperatorHandle<Sig> op = find<Sig>(name); \
    return op;                                                 \
  }
VAEKERN_KERNEL(bernoulli_nll_kernel, BernoulliNLLSig, "vaekern::bernoulli_nll")
VAEKERN_KERNEL(continuous_bernoulli_nll_kernel, BernoulliNLLSig, "vaekern::continuous_bernoulli_nll")
VAEKERN_KERNEL(gaussian_nll_kernel, GaussianNLLSig, "vaekern::gaussian_nll")
VAEKERN_KERNEL(bernoulli_nll_backward_kernel, ScaleRowsSig, "vaekern::bernoulli_nll_backward_")
VAEKERN_KERNEL(continuous_bernoulli_nll_backward_kernel, ScaleRowsSig, "vaekern::continuous_bernoulli_nll_backward_")
VAEKERN_KERNEL(gaussian_nll_backward_kernel, ScaleGaussianRowsSig, "vaekern::gaussian_nll_backward_")
VAEKERN_KERNEL(gaussian_kl_kernel, GaussianKLSig, "vaekern::gaussian_kl")
VAEKERN_KERNEL(gaussian_kl_backward_kernel, KLGradsSig, "vaekern::gaussian_kl_backward")
VAEKERN_KERNEL(reparameterize_kernel, ReparameterizeSig, "vaekern::reparameterize")
VAEKERN_KERNEL(reparameterize_backward_kernel, ReparameterizeBackwardSig, "vaekern::reparameterize_backward")
VAEKERN_KERNEL(vae_loss_kernel, VAELossSig, "vaekern::vae_loss")
VAEKERN_KERNEL(vae_loss_backward_kernel, VAELossBackwardSig, "vaekern::vae_loss_backward_")
#undef VAEKERN_KERNEL

// AOTAutograd traces with fake tensors (a Python subclass) under functionalization: a
// tensor that carries either key is being traced, not computed.
bool traced(const Tensor& t) {
  return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// Whether backward may scale the forward's gradient in place: only a real tensor whose
// memory no one else sees (the rule by which AccumulateGrad adopts a buffer, applied to the
// storage). vaekern.functional drops the op's gradient output, so that is the usual case;
// a caller who keeps it (or opcheck, which compares it) gets an out-of-place product and an
// unchanged output.
bool scale_in_place(const Tensor& grad, const Tensor& grad_out) {
  return grad.use_count() == 1 && grad.storage().use_count() == 1 && !traced(grad) && !traced(grad_out);
}

// The gradient output the caller gets: in eager mode an alias of ctx's buffer (the same
// memory, its own TensorImpl). A tensor that once had a Python object keeps a second owner
// after Python drops it (torch preserves the object while C++ holds the tensor), which
// would make AccumulateGrad copy the buffer instead of adopting it; the alias takes that
// object instead, and dies with it.
Tensor visible(const Tensor& grad) {
  return traced(grad) ? grad : grad.alias();
}

void no_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "vaekern.", op,
              ": double backward (create_graph=True) is not supported, because the reconstruction gradient is "
              "computed in the forward pass and has no graph of its own. Use backend=\"reference\" (plain "
              "PyTorch autograd) for higher-order gradients.");
}

// grad_out (() or (B,)) shaped to broadcast over the rows of an ndim tensor. Sizes are
// symbolic: under torch.compile's dynamic shapes the batch is a SymInt.
Tensor per_row(const Tensor& scale, const c10::SymInt& batch, int64_t ndim) {
  std::vector<c10::SymInt> shape(ndim, c10::SymInt(1));
  shape[0] = batch;
  return scale.expand_symint({batch}).reshape_symint(shape);
}

// vae_loss's `likelihood` (vaekern/_ops/_common.py LIKELIHOODS).
enum Likelihood : int64_t { kBernoulli = 0, kGaussian = 1, kContinuousBernoulli = 2 };

// The likelihood's in-place backward kernel: saved * scale per row, with the float16
// recompute from input and target (log_scale: the Gaussian's, from_logits: the others').
void scale_likelihood_rows(int64_t likelihood, const Tensor& grad, const Tensor& scale, const Tensor& input,
                           const Tensor& target, const Tensor& log_scale, bool from_logits, int64_t reduction) {
  switch (likelihood) {
    case kGaussian: return gaussian_nll_backward_kernel().call(grad, scale, input, target, log_scale, reduction);
    case kContinuousBernoulli:
      return continuous_bernoulli_nll_backward_kernel().call(grad, scale, input, target, from_logits, reduction);
    default: return bernoulli_nll_backward_kernel().call(grad, scale, input, target, from_logits, reduction);
  }
}

// The out-of-place backward: saved * scale per row, in saved's dtype. A float16 gradient
// is scaled by the kernel, on a copy, which recomputes the elements that overflowed or
// lost bits in float16 in forward (input, target: the likelihood's).
Tensor scaled_rows(int64_t likelihood, const Tensor& saved, const Tensor& scale, const Tensor& input,
                   const Tensor& target, const Tensor& log_scale, bool from_logits, int64_t reduction) {
  if (saved.scalar_type() == at::kHalf) {
    Tensor out = saved.clone();
    scale_likelihood_rows(likelihood, out, scale, input, target, log_scale, from_logits, reduction);
    return out;
  }
  return (saved * per_row(scale, saved.sym_size(0), saved.dim())).to(saved.scalar_type());
}

// d(grad_out . reduced Gaussian NLL)/d(log_scale), in ATen ops autograd can differentiate;
// as vaekern/_ops/gaussian_nll.py's log_scale_grad (log_scale 0-d or one per column), whose
// header derives the 0-d form: from the reduced NLL `loss` alone, with no pass over input
// and target.
Tensor log_scale_grad(const Tensor& grad_out, const Tensor& input, const Tensor& target, const Tensor& log_scale,
                      int64_t reduction, const Tensor& loss) {
  const c10::SymInt batch = input.sym_size(0);
  const c10::ScalarType acc = log_scale.scalar_type();
  if (log_scale.dim() == 0) {
    if (batch == 0) return at::zeros_like(log_scale);  // no rows, no gradient (mean's loss is 0/0)
    c10::SymInt count = reduction == 2 ? batch : c10::SymInt(1);  // D per row (none, mean), B * D summed
    for (int64_t d = 1; d < input.dim(); ++d) count = count * input.sym_size(d);
    const Tensor per_unit = (log_scale + kHalfLog2Pi) * 2 + 1;
    return (grad_out.to(acc) * (per_unit.mul(c10::Scalar(count)) - loss.to(acc) * 2)).sum();
  }
  Tensor w = per_row((reduction == 1 ? grad_out.div(c10::Scalar(batch)) : grad_out).to(acc), batch, 2);
  Tensor r = (input.to(acc) - target.to(acc)).reshape_symint({batch, c10::SymInt(-1)});
  Tensor per_column = (w * (1 - r * r * at::exp(log_scale * -2))).sum(0);
  return per_column;
}

// The loss output to save for backward: only where backward reads it, for a learned 0-d
// Gaussian log_scale's gradient (log_scale_grad). A saved output makes an in-place change
// to it an error at backward (loss += c), as for any op that saves its result, so nothing
// else saves it; as vaekern/_ops/_common.py's loss_read_by_backward.
Tensor loss_read_by_backward(const Tensor& log_scale, const Tensor& loss) {
  return log_scale.defined() && log_scale.dim() == 0 && log_scale.requires_grad() ? loss : Tensor();
}

// Keeps the forward's reconstruction gradient in ctx for the first backward, with what a
// later backward needs to recompute it; returns the output the caller sees (visible).
Tensor keep_saved_grad(AutogradContext* ctx, const Tensor& grad, bool from_logits, int64_t reduction,
                       bool compute_grad) {
  Tensor shown = visible(grad);
  ctx->mark_non_differentiable({shown});
  ctx->set_materialize_grads(false);
  ctx->saved_data["from_logits"] = from_logits;
  ctx->saved_data["reduction"] = reduction;
  ctx->saved_data["grad"] = grad;
  ctx->saved_data["grad_computed"] = compute_grad;
  return shown;
}

// The forward's gradient for the first backward only; undefined after.
Tensor take_saved_grad(AutogradContext* ctx) {
  auto it = ctx->saved_data.find("grad");
  if (it == ctx->saved_data.end() || it->second.isNone()) return Tensor();
  Tensor grad = it->second.toTensor();
  it->second = c10::IValue();  // drop ctx's reference, so that AccumulateGrad can adopt the buffer
  return grad;
}

// Whether a call needs the Function: grad mode is on and an input requires grad, or an input
// carries a forward-mode tangent (which the Function refuses: no kernel has a forward-mode
// formula). Otherwise the Autograd kernels below call the kernel directly, below autograd:
// a Function's node, context and output wrapping cost about 3 us of a 9 us no-grad call of
// vae_loss on 1x1 CPU tensors (Intel Xeon, 1 thread, torch 2.14.1).
bool builds_graph(std::initializer_list<const Tensor*> inputs) {
  const bool grad_mode = at::GradMode::is_enabled();
  for (const Tensor* t : inputs) {
    if (t == nullptr || !t->defined()) continue;
    if ((grad_mode && t->requires_grad()) || t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// ---- the likelihood ops: bernoulli_nll, continuous_bernoulli_nll, gaussian_nll -----------
// One Function for the three: they differ in their kernels and in their own argument,
// Param: the Bernoullis' `bool from_logits`, or the Gaussian's `Tensor log_scale`, learned
// where it requires grad (log_scale_grad, from the saved loss for a 0-d one).
template <int64_t kLikelihood, class Param>
struct LikelihoodFunction : public torch::autograd::Function<LikelihoodFunction<kLikelihood, Param>> {
  static constexpr bool kTensorParam = std::is_same_v<Param, Tensor>;
  static constexpr const char* kName = kLikelihood == kGaussian                ? "gaussian_nll"
                                       : kLikelihood == kContinuousBernoulli ? "continuous_bernoulli_nll"
                                                                             : "bernoulli_nll";

  static std::tuple<Tensor, Tensor> kernel(const Tensor& input, const Tensor& target, const Param& param,
                                           int64_t reduction, bool compute_grad) {
    if constexpr (kTensorParam) return gaussian_nll_kernel().call(input, target, param, reduction, compute_grad);
    else if constexpr (kLikelihood == kContinuousBernoulli)
      return continuous_bernoulli_nll_kernel().call(input, target, param, reduction, compute_grad);
    else return bernoulli_nll_kernel().call(input, target, param, reduction, compute_grad);
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& target, const Param& param,
                               int64_t reduction, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, grad] = kernel(input, target, param, reduction, compute_grad);
    if constexpr (kTensorParam) {
      Tensor shown = keep_saved_grad(ctx, grad, /*from_logits=*/false, reduction, compute_grad);  // unread
      ctx->save_for_backward({input, target, param, loss_read_by_backward(param, loss)});
      return {loss, shown};
    } else {
      Tensor shown = keep_saved_grad(ctx, grad, param, reduction, compute_grad);
      ctx->save_for_backward({input, target});
      return {loss, shown};
    }
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (ctx->needs_input_grad(0)) no_double_backward(kName);  // through log_scale alone it works
    variable_list out(5);
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return out;
    auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &target = saved[1];
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const Tensor log_scale = kTensorParam ? saved[2] : Tensor();                        // the Gaussian's
    const bool from_logits = !kTensorParam && ctx->saved_data["from_logits"].toBool();  // the Bernoullis'
    Param param;
    if constexpr (kTensorParam) {
      param = log_scale;
      if (ctx->needs_input_grad(2)) out[2] = log_scale_grad(grad_out, input, target, log_scale, reduction, saved[3]);
    } else {
      param = from_logits;
    }
    if (!ctx->needs_input_grad(0)) return out;
    Tensor grad = take_saved_grad(ctx);
    if (!grad.defined() || !ctx->saved_data["grad_computed"].toBool()) {  // a second backward, or none computed
      grad = std::get<1>(kernel(input, target, param, reduction, true));
    }
    if (scale_in_place(grad, grad_out)) {
      scale_likelihood_rows(kLikelihood, grad, grad_out, input, target, log_scale, from_logits, reduction);
    } else {
      grad = scaled_rows(kLikelihood, grad, grad_out, input, target, log_scale, from_logits, reduction);
    }
    out[0] = grad;
    return out;
  }
};

// Param as the schema's C++ signature passes it: a bool by value, a Tensor by reference.
template <class Param>
using ParamArg = std::conditional_t<std::is_same_v<Param, Tensor>, const Tensor&, bool>;

template <int64_t kLikelihood, class Param>
std::tuple<Tensor, Tensor> likelihood_autograd(const Tensor& input, const Tensor& target, ParamArg<Param> param,
                                               int64_t reduction, bool compute_grad) {
  using F = LikelihoodFunction<kLikelihood, Param>;
  const Tensor* tensor_param = nullptr;
  if constexpr (F::kTensorParam) tensor_param = &param;
  if (!builds_graph({&input, &target, tensor_param})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return F::kernel(input, target, param, reduction, compute_grad);
  }
  auto out = F::apply(input, target, param, reduction, compute_grad);
  return {out[0], out[1]};
}

// ---- gaussian_kl ---------------------------------------------------------------------------
// float64 if any tensor is float64, else float32: the kernels' math (vaekern/_ops/_common.py).
c10::ScalarType acc_dtype(std::initializer_list<c10::ScalarType> dtypes) {
  for (c10::ScalarType t : dtypes) {
    if (t == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

using KLGrads = std::tuple<Tensor, Tensor, Tensor, Tensor>;

OptionalTensor optional(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

const Tensor* present(const OptionalTensor& t) { return t.has_value() ? &*t : nullptr; }

// (d/dmu, d/dlogvar, d/dprior_mu, d/dprior_logvar) of the reduced KL times grad_out, the
// priors' per element (undefined where absent), in ATen ops that autograd can
// differentiate: the formula of vaekern/_ops/_common.py differentiable_kl_grads. In the
// kernels' math dtype and rounded once: expm1 of a float16 logvar in float16 is inf above
// 11.09 where the gradient is finite.
KLGrads differentiable_kl_grads(const Tensor& grad_out, const Tensor& mu, const Tensor& logvar, const Tensor& prior_mu,
                                const Tensor& prior_logvar, int64_t reduction) {
  const c10::SymInt batch = mu.sym_size(0);
  const c10::ScalarType acc = acc_dtype({mu.scalar_type(), logvar.scalar_type(), grad_out.scalar_type()});
  // One upstream per row, or per latent element for the column reduction.
  Tensor s = reduction == kKlColumns
                 ? grad_out.to(acc).unsqueeze(0)
                 : per_row((reduction == 1 ? grad_out.div(c10::Scalar(batch)) : grad_out).to(acc), batch, mu.dim());
  Tensor m = mu.to(acc), lv = logvar.to(acc), e;
  if (prior_mu.defined()) m = m - prior_mu.to(acc);
  if (prior_logvar.defined()) {
    e = at::exp(prior_logvar.to(acc) * -0.5);
    m = m * e;
    lv = lv - prior_logvar.to(acc);
  }
  Tensor g_m = s * m;
  Tensor g_lv = s * 0.5 * at::expm1(lv.clamp_max(kLogvarMax));
  Tensor g_mu = e.defined() ? g_m * e : g_m;
  Tensor g_pm = prior_mu.defined() ? (-g_mu).to(prior_mu.scalar_type()) : Tensor();
  Tensor g_plv = prior_logvar.defined() ? (-g_lv - g_m * m * 0.5).to(prior_logvar.scalar_type()) : Tensor();
  return {g_mu.to(mu.scalar_type()), g_lv.to(logvar.scalar_type()), g_pm, g_plv};
}

// A KL backward's gradients with each prior's, which the kernels write per latent element,
// summed over the dims the prior broadcasts (the one ATen op of its backward); undefined
// where the prior is absent or needs none (vaekern/_ops/_common.py reduced_prior_grads).
KLGrads reduced_prior_grads(KLGrads grads, const Tensor& prior_mu, const Tensor& prior_logvar, bool want_prior_mu,
                            bool want_prior_logvar) {
  const auto reduced = [](const Tensor& grad, const Tensor& prior, bool wanted) {
    if (!prior.defined() || !wanted) return Tensor();
    return grad.sym_sizes().equals(prior.sym_sizes()) ? grad : grad.sum_to_size_symint(prior.sym_sizes());
  };
  std::get<2>(grads) = reduced(std::get<2>(grads), prior_mu, want_prior_mu);
  std::get<3>(grads) = reduced(std::get<3>(grads), prior_logvar, want_prior_logvar);
  return grads;
}

// The KL's backward: the kernel, or its differentiable form when backward builds a graph;
// each prior's gradient reduced to its shape where wanted.
KLGrads kl_grads(const Tensor& grad_out, const Tensor& mu, const Tensor& logvar, const Tensor& prior_mu,
                 const Tensor& prior_logvar, int64_t reduction, bool want_prior_mu, bool want_prior_logvar) {
  return reduced_prior_grads(
      at::GradMode::is_enabled()
          ? differentiable_kl_grads(grad_out, mu, logvar, prior_mu, prior_logvar, reduction)
          : gaussian_kl_backward_kernel().call(grad_out, mu, logvar, optional(prior_mu), optional(prior_logvar),
                                               reduction),
      prior_mu, prior_logvar, want_prior_mu, want_prior_logvar);
}

// needs_input_grad counts the tensors given, an absent optional skipped: (whether the prior's
// mean, whether its log-variance needs a gradient), the mean's edge being `first`.
std::pair<bool, bool> prior_needs_grad(AutogradContext* ctx, const Tensor& prior_mu, const Tensor& prior_logvar,
                                       size_t first) {
  return {prior_mu.defined() && ctx->needs_input_grad(first),
          prior_logvar.defined() && ctx->needs_input_grad(first + (prior_mu.defined() ? 1 : 0))};
}

struct GaussianKLFunction : public torch::autograd::Function<GaussianKLFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar, const OptionalTensor& prior_mu,
                        const OptionalTensor& prior_logvar, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["reduction"] = reduction;
    ctx->save_for_backward({mu, logvar, prior_mu.value_or(Tensor()), prior_logvar.value_or(Tensor())});
    return gaussian_kl_kernel().call(mu, logvar, prior_mu, prior_logvar, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto [want_pm, want_plv] = prior_needs_grad(ctx, saved[2], saved[3], 2);
    auto [g_mu, g_lv, g_pm, g_plv] = kl_grads(grads[0], saved[0], saved[1], saved[2], saved[3],
                                              ctx->saved_data["reduction"].toInt(), want_pm, want_plv);
    return {g_mu, g_lv, g_pm, g_plv, Tensor()};
  }
};

Tensor gaussian_kl_autograd(const Tensor& mu, const Tensor& logvar, const OptionalTensor& prior_mu,
                            const OptionalTensor& prior_logvar, int64_t reduction) {
  if (!builds_graph({&mu, &logvar, present(prior_mu), present(prior_logvar)})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return gaussian_kl_kernel().call(mu, logvar, prior_mu, prior_logvar, reduction);
  }
  return GaussianKLFunction::apply(mu, logvar, prior_mu, prior_logvar, reduction);
}

// ---- reparameterize ------------------------------------------------------------------------
struct ReparameterizeFunction : public torch::autograd::Function<ReparameterizeFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar,
                        const std::optional<Tensor>& eps, const std::optional<Tensor>& seed) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({mu, logvar, eps.value_or(Tensor()), seed.value_or(Tensor())});
    return reparameterize_kernel().call(mu, logvar, eps, seed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &grad_z = grads[0], &mu = saved[0], &logvar = saved[1];
    std::optional<Tensor> eps, seed;
    if (saved[2].defined()) eps = saved[2];
    if (saved[3].defined()) seed = saved[3];
    if (!at::GradMode::is_enabled()) {
      auto [g_mu, g_lv] = reparameterize_backward_kernel()
                              .call(grad_z, mu, logvar, eps, seed);
      return {g_mu, g_lv, Tensor(), Tensor()};
    }
    // Double backward: the kernel's own noise is z(0, 0) = eps exactly (exp(0) = 1), drawn
    // in the math dtype (it depends on the element's index only). In that dtype and rounded
    // once: exp(logvar / 2) of a float16 logvar is inf above 22.2 where the gradient is not.
    const c10::ScalarType acc = acc_dtype({mu.scalar_type()});
    Tensor noise = eps.has_value() ? *eps : [&] {
      Tensor zeros = at::zeros_symint(mu.sym_sizes(), mu.options().dtype(acc));
      return reparameterize_kernel().call(zeros, zeros, std::nullopt, seed);
    }();
    Tensor g_lv = grad_z.to(acc) * 0.5 * at::exp(logvar.to(acc) * 0.5) * noise.to(acc);
    return {grad_z, g_lv.to(logvar.scalar_type()), Tensor(), Tensor()};
  }
};

Tensor reparameterize_autograd(const Tensor& mu, const Tensor& logvar, const std::optional<Tensor>& eps,
                               const std::optional<Tensor>& seed) {
  if (!builds_graph({&mu, &logvar, eps.has_value() ? &*eps : nullptr})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return reparameterize_kernel().call(mu, logvar, eps, seed);
  }
  return ReparameterizeFunction::apply(mu, logvar, eps, seed);
}

// ---- vae_loss ------------------------------------------------------------------------------
// The KL backward's (upstream, reduction) for the loss's KL scale g_loss * beta + g_kl: as it
// is, or under free bits one per latent element for the column reduction, the scale (/ B
// for mean) where kl_weight is not 0, else 0 whatever the scale (vaekern/_ops/vae_loss.py
// _kl_upstream).
std::pair<Tensor, int64_t> kl_upstream(const Tensor& scale, const Tensor& kl_weight, const Tensor& mu,
                                       int64_t reduction) {
  if (!kl_weight.defined()) return {scale, reduction};
  const Tensor s = reduction == 1 ? scale.div(c10::Scalar(mu.sym_size(0))) : scale;
  return {at::where(kl_weight.ne(0), s, at::zeros_like(s)), kKlColumns};
}

struct VAELossFunction : public torch::autograd::Function<VAELossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& recon, const Tensor& target, const Tensor& mu,
                               const Tensor& logvar, const OptionalTensor& prior_mu,
                               const OptionalTensor& prior_logvar, const OptionalTensor& free_bits,
                               const Tensor& beta, const Tensor& log_scale, int64_t likelihood, bool from_logits,
                               int64_t reduction, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, rec, kl, grad, weight] = vae_loss_kernel().call(recon, target, mu, logvar, prior_mu, prior_logvar,
                                                                free_bits, beta, log_scale, likelihood, from_logits,
                                                                reduction, compute_grad);
    Tensor shown = keep_saved_grad(ctx, grad, from_logits, reduction, compute_grad);
    ctx->mark_non_differentiable({weight});
    ctx->saved_data["likelihood"] = likelihood;
    ctx->save_for_backward({recon, target, mu, logvar, beta, log_scale,
                            likelihood == kGaussian ? loss_read_by_backward(log_scale, rec) : Tensor(),
                            prior_mu.value_or(Tensor()), prior_logvar.value_or(Tensor()),
                            free_bits.value_or(Tensor()), free_bits.has_value() ? weight : Tensor()});
    return {loss, rec, kl, shown, weight};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool want_recon = ctx->needs_input_grad(0);
    if (want_recon) no_double_backward("vae_loss");
    const Tensor* present = nullptr;
    for (int i = 0; i < 3; ++i) {
      if (grads[i].defined()) present = &grads[i];
    }
    if (present == nullptr) return variable_list(13);
    // An output that took no part in the loss has an undefined gradient: zero.
    Tensor zero;
    for (int i = 0; i < 3; ++i) {
      if (!grads[i].defined()) grads[i] = zero.defined() ? zero : (zero = at::zeros_like(*present));
    }
    const Tensor &grad_loss = grads[0], &grad_recon_term = grads[1], &grad_kl_term = grads[2];
    auto saved = ctx->get_saved_variables();
    const Tensor &recon = saved[0], &target = saved[1], &mu = saved[2], &logvar = saved[3], &beta = saved[4],
                 &log_scale = saved[5], &rec = saved[6], &prior_mu = saved[7], &prior_logvar = saved[8],
                 &free_bits = saved[9], &kl_weight = saved[10];
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const int64_t likelihood = ctx->saved_data["likelihood"].toInt();
    const bool from_logits = ctx->saved_data["from_logits"].toBool();
    // One gradient per argument: recon, target, mu, logvar, prior_mu, prior_logvar,
    // free_bits, beta, log_scale and four non-tensors. needs_input_grad skips an absent
    // optional (a prior part, free_bits).
    variable_list out(13);
    const auto [want_pm, want_plv] = prior_needs_grad(ctx, prior_mu, prior_logvar, 4);
    const size_t log_scale_edge =
        5 + (prior_mu.defined() ? 1 : 0) + (prior_logvar.defined() ? 1 : 0) + (free_bits.defined() ? 1 : 0);
    // A learned Gaussian log_scale: its formula, before the saved gradient is scaled.
    if (ctx->needs_input_grad(log_scale_edge)) {
      out[8] = log_scale_grad(grad_loss + grad_recon_term, recon, target, log_scale, reduction, rec);
    }
    const auto set_kl = [&](KLGrads g) { std::tie(out[2], out[3], out[4], out[5]) = std::move(g); };
    const auto latent_grads = [&] {
      const auto [upstream, kl_reduction] = kl_upstream(grad_loss * beta + grad_kl_term, kl_weight, mu, reduction);
      set_kl(kl_grads(upstream, mu, logvar, prior_mu, prior_logvar, kl_reduction, want_pm, want_plv));
    };
    if (at::GradMode::is_enabled()) {  // create_graph=True, recon needs no gradient: the KL's, differentiable
      latent_grads();
      return out;
    }
    Tensor grad = take_saved_grad(ctx);
    if (want_recon && (!grad.defined() || !ctx->saved_data["grad_computed"].toBool())) {  // a second backward, or none
      grad = std::get<3>(vae_loss_kernel().call(recon, target, mu, logvar, optional(prior_mu), optional(prior_logvar),
                                                optional(free_bits), beta, log_scale, likelihood, from_logits,
                                                reduction, true));
    }
    if (want_recon && !scale_in_place(grad, grad_loss)) {
      out[0] = scaled_rows(likelihood, grad, grad_loss + grad_recon_term, recon, target, log_scale, from_logits,
                           reduction);
      latent_grads();
      return out;
    }
    if (!want_recon) grad = recon.new_empty_symint({c10::SymInt(0)});
    set_kl(reduced_prior_grads(vae_loss_backward_kernel().call(grad, grad_loss, grad_recon_term, grad_kl_term, recon,
                                                               target, log_scale, mu, logvar, optional(prior_mu),
                                                               optional(prior_logvar), optional(kl_weight), beta,
                                                               likelihood, from_logits, reduction),
                               prior_mu, prior_logvar, want_pm, want_plv));
    if (want_recon) out[0] = grad;
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> vae_loss_autograd(
    const Tensor& recon, const Tensor& target, const Tensor& mu, const Tensor& logvar, const OptionalTensor& prior_mu,
    const OptionalTensor& prior_logvar, const OptionalTensor& free_bits, const Tensor& beta, const Tensor& log_scale,
    int64_t likelihood, bool from_logits, int64_t reduction, bool compute_grad) {
  if (!builds_graph({&recon, &target, &mu, &logvar, present(prior_mu), present(prior_logvar), present(free_bits), &beta,
                     &log_scale})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return vae_loss_kernel().call(recon, target, mu, logvar, prior_mu, prior_logvar, free_bits, beta, log_scale,
                                  likelihood, from_logits, reduction, compute_grad);
  }
  auto out = VAELossFunction::apply(recon, target, mu, logvar, prior_mu, prior_logvar, free_bits, beta, log_scale,
                                    likelihood, from_logits, reduction, compute_grad);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vaekern, Autograd, m) {
  m.impl("bernoulli_nll", &likelihood_autograd<kBernoulli, bool>);
  m.impl("continuous_bernoulli_nll", &likelihood_autograd<kContinuousBernoulli, bool>);
  m.impl("gaussian_nll", &likelihood_autograd<kGaussian, Tensor>);
  m.impl("gaussian_kl", &gaussian_kl_autograd);
  m.impl("reparameterize", &reparameterize_autograd);
  m.impl("vae_loss", &vae_loss_autograd);
}

}  // namespace vaekern::autograd
