// bernoulli_nll on CPU: the Bernoulli negative log-likelihood and, in the same pass, its
// gradient.
//
// Math (l logits, p probabilities, t targets; per element, summed over each row):
//   logits: nll = max(l, 0) - l*t + log1p(exp(-|l|)),     d nll/dl = sigmoid(l) - t
//   probs:  nll = -(t*max(log p, -100) + (1-t)*max(log1p(-p), -100)),
//           d nll/dp = (p - t) / max(p*(1-p), 1e-12)      (F.binary_cross_entropy's)
// The gradient of the reduced loss for an upstream 1 (with 1/B for mean) is written in
// forward, into a fresh contiguous buffer that autograd saves; backward
// (bernoulli_nll_backward_) scales its rows in place and skips rows whose scale is 1.
//
// dtypes: input float32/float64/bfloat16/float16, computed in float (double for double);
// target any of those, bool or uint8. Loss float32, float64 for float64 input.
// Non-contiguous inputs are copied to contiguous first.
// Determinism: see vaekern_cpu.h (fixed chunks, fixed-order sums).
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/ops.h"

namespace vaekern::cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const size_t size = (n + kHugePage - 1) / kHugePage * kHugePage;
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kHugePage, size) == 0, "vaekern (cpu): out of memory allocating ", n, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, size, MADV_HUGEPAGE);  // a hint: without THP the pages are simply small
#endif
    return {p, p, &std::free, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &std::free; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (nbytes >= 2 * kHugePage) {
    static HugePageAllocator allocator;
    return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), std::nullopt);
  }
#endif
  return at::empty(sizes, options);
}

std::vector<double> row_values(const at::Tensor& t, int64_t rows, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "vaekern (cpu): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.numel() == 1 || (t.dim() == 1 && t.size(0) == rows), "vaekern (cpu): ", name,
              " must have one element or shape (", rows, ",), got ", t.sizes());
  std::vector<double> out(rows);
  const int64_t stride = t.numel() == 1 ? 0 : t.stride(0);
  auto fill = [&](const auto* p) {
    for (int64_t b = 0; b < rows; ++b) out[b] = static_cast<double>(p[b * stride]);
  };
  switch (t.scalar_type()) {
    case at::kFloat: fill(t.const_data_ptr<float>()); break;
    case at::kDouble: fill(t.const_data_ptr<double>()); break;
    case at::kBFloat16: fill(t.const_data_ptr<c10::BFloat16>()); break;
    case at::kHalf: fill(t.const_data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "vaekern (cpu): ", name, " must be a floating tensor, got ", t.scalar_type());
  }
  return out;
}

double reduced_value(const std::vector<double>& rows, int64_t reduction) {
  double s = 0;
  for (double r : rows) s += r;
  return reduction == 1 ? s / static_cast<double>(rows.size()) : s;
}

at::Tensor reduce_rows(const std::vector<double>& rows, int64_t reduction, c10::ScalarType dtype) {
  const int64_t n = static_cast<int64_t>(rows.size());
  at::Tensor out = at::empty(reduction == 0 ? at::IntArrayRef{n} : at::IntArrayRef{}, at::TensorOptions().dtype(dtype));
  auto write = [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    if (reduction == 0) {
      for (int64_t b = 0; b < n; ++b) p[b] = static_cast<T>(rows[b]);
      return;
    }
    p[0] = static_cast<T>(reduced_value(rows, reduction));
  };
  if (dtype == at::kDouble) write(out.mutable_data_ptr<double>()); else write(out.mutable_data_ptr<float>());
  return out;
}

std::vector<double> bernoulli_nll_rows(const at::Tensor& input_, const at::Tensor& target_, bool from_logits,
                                       double grad_scale, const at::Tensor& grad) {
  const at::Tensor input = input_.contiguous();
  const at::Tensor target = target_.contiguous();
  const int64_t rows = input.size(0), cols = row_len(input);
  const int64_t chunks = num_chunks(cols);
  std::vector<double> partials(rows * chunks);
  BernoulliNllArgs args{input.const_data_ptr(), input.scalar_type(), target.const_data_ptr(),
                        target.scalar_type(), grad.defined() ? grad.mutable_data_ptr() : nullptr,
                        partials.data(), rows, cols, chunks, from_logits, grad_scale};
  const Kernels& k = kernels();
  at::parallel_for(0, rows * chunks, grain(std::min(cols, kChunk)),
                   [&](int64_t begin, int64_t end) { k.bernoulli_nll(args, begin, end); });
  std::vector<double> out(rows, 0.0);
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t c = 0; c < chunks; ++c) out[b] += partials[b * chunks + c];
  }
  return out;
}

void scale_rows_(const at::Tensor& grad, const std::vector<double>& scale) {
  bool all_one = true;
  for (double s : scale) all_one = all_one && s == 1.0;
  if (all_one || grad.numel() == 0) return;
  TORCH_CHECK(is_float(grad.scalar_type()), "vaekern (cpu): the saved gradient must be floating, got ",
              grad.scalar_type());
  at::Tensor g = grad.is_contiguous() ? grad : grad.contiguous();
  const int64_t rows = g.size(0), cols = row_len(g), chunks = num_chunks(cols);
  ScaleRowsArgs args{g.mutable_data_ptr(), g.scalar_type(), scale.data(), rows, cols, chunks};
  const Kernels& k = kernels();
  at::parallel_for(0, rows * chunks, 4 * grain(std::min(cols, kChunk)),
                   [&](int64_t begin, int64_t end) { k.scale_rows(args, begin, end); });
  if (!g.is_same(grad)) grad.copy_(g);
}

namespace {

std::tuple<at::Tensor, at::Tensor> bernoulli_nll_cpu(const at::Tensor& input, const at::Tensor& target,
                                                     bool from_logits, int64_t reduction, bool compute_grad) {
  check_float(input, "input");
  check_target(target, input);
  check_reduction(reduction);
  const int64_t rows = input.size(0);
  at::Tensor grad = compute_grad ? empty_output(input.sizes(), input.options()) : input.new_empty({0});
  const double grad_scale = reduction == 1 ? 1.0 / static_cast<double>(rows) : 1.0;
  const auto nll = bernoulli_nll_rows(input, target, from_logits, grad_scale, compute_grad ? grad : at::Tensor());
  return {reduce_rows(nll, reduction, acc_dtype({&input})), grad};
}

void bernoulli_nll_backward_cpu(const at::Tensor& grad_input, const at::Tensor& grad_out) {
  if (grad_input.numel() == 0) return;
  scale_rows_(grad_input, row_values(grad_out, grad_input.size(0), "grad_out"));
}

}  // namespace

TORCH_LIBRARY_IMPL(vaekern, CPU, m) {
  m.impl("bernoulli_nll", &bernoulli_nll_cpu);
  m.impl("bernoulli_nll_backward_", &bernoulli_nll_backward_cpu);
}

}  // namespace vaekern::cpu
