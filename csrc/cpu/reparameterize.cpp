// reparameterize on CPU: z = mu + exp(lv / 2) * eps.
//
// Math: dz/dmu = 1, dz/dlv = 0.5 * exp(lv / 2) * eps.
// eps is either given, or drawn in the op: a standard normal per element from
// Philox-4x32-10 keyed on (seed, element index) (reparameterize_kernel.h), where seed is
// an int64 tensor drawn from torch's CPU generator by vaekern.functional, so
// torch.manual_seed reproduces z. The noise is not saved: backward regenerates it from the
// seed. reparameterize(zeros, zeros, None, seed) returns exactly the noise.
//
// dtypes: mu, logvar (and eps) float32/float64/bfloat16/float16, one dtype; computed in
// float (double for double). Outputs contiguous.
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "cpu/checks.h"
#include "cpu/row_ops.h"

namespace vaekern::cpu {
namespace {

struct Noise {
  at::Tensor eps;  // contiguous, mu's dtype; undefined when seeded
  uint64_t seed = 0;
};

Noise noise(const at::Tensor& mu, const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed) {
  const bool has_eps = eps.has_value() && eps->defined();
  const bool has_seed = seed.has_value() && seed->defined();
  TORCH_CHECK(has_eps != has_seed, "vaekern (cpu): reparameterize needs exactly one of eps and seed");
  Noise n;
  if (has_eps) {
    TORCH_CHECK(eps->sizes() == mu.sizes(), "vaekern (cpu): eps has shape ", eps->sizes(), " but mu has shape ",
                mu.sizes());
    check_float(*eps, "eps");
    n.eps = eps->to(mu.scalar_type()).contiguous();
  } else {
    TORCH_CHECK(seed->device().is_cpu() && seed->scalar_type() == at::kLong && seed->numel() >= 1,
                "vaekern (cpu): seed must be a CPU int64 tensor with one element, got ", seed->scalar_type(), " ",
                seed->sizes());
    n.seed = static_cast<uint64_t>(seed->contiguous().const_data_ptr<int64_t>()[0]);
  }
  return n;
}

ReparameterizeArgs make_args(const at::Tensor& mu, const at::Tensor& logvar, const Noise& n) {
  ReparameterizeArgs args{};
  args.mu = mu.const_data_ptr();
  args.logvar = logvar.const_data_ptr();
  args.eps = n.eps.defined() ? n.eps.const_data_ptr() : nullptr;
  args.dtype = mu.scalar_type();
  args.seed = n.seed;
  args.n = mu.numel();
  return args;
}

template <typename F>
void for_blocks(int64_t n, F&& f) {
  const int64_t blocks = (n + kNoiseBlock - 1) / kNoiseBlock;
  at::parallel_for(0, blocks, grain(kNoiseBlock) / 2, std::forward<F>(f));
}

at::Tensor reparameterize_cpu(const at::Tensor& mu_, const at::Tensor& logvar_, const std::optional<at::Tensor>& eps,
                              const std::optional<at::Tensor>& seed) {
  check_latents(mu_, logvar_);
  const at::Tensor mu = mu_.contiguous(), logvar = logvar_.contiguous();
  const Noise n = noise(mu, eps, seed);
  at::Tensor z = at::empty(mu.sizes(), mu.options());
  ReparameterizeArgs args = make_args(mu, logvar, n);
  args.z = z.mutable_data_ptr();
  const Kernels& k = kernels();
  for_blocks(args.n, [&](int64_t begin, int64_t end) { k.reparameterize(args, begin, end); });
  return z;
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward_cpu(const at::Tensor& grad_z_, const at::Tensor& mu,
                                                               const at::Tensor& logvar_,
                                                               const std::optional<at::Tensor>& eps,
                                                               const std::optional<at::Tensor>& seed) {
  check_latents(mu, logvar_);
  TORCH_CHECK(grad_z_.sizes() == mu.sizes(), "vaekern (cpu): grad_z has shape ", grad_z_.sizes(),
              " but mu has shape ", mu.sizes());
  const at::Tensor logvar = logvar_.contiguous();
  at::Tensor grad_mu = at::empty(mu.sizes(), mu.options());
  grad_mu.copy_(grad_z_);
  const Noise n = noise(mu, eps, seed);
  at::Tensor grad_logvar = at::empty(logvar.sizes(), logvar.options());
  ReparameterizeArgs args = make_args(mu, logvar, n);
  args.grad_z = grad_mu.const_data_ptr();
  args.grad_logvar = grad_logvar.mutable_data_ptr();
  const Kernels& k = kernels();
  for_blocks(args.n, [&](int64_t begin, int64_t end) { k.reparameterize_backward(args, begin, end); });
  return {grad_mu, grad_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(vaekern, CPU, m) {
  m.impl("reparameterize", &reparameterize_cpu);
  m.impl("reparameterize_backward", &reparameterize_backward_cpu);
}

}  // namespace vaekern::cpu
