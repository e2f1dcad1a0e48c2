// The row operations of row_ops.h.
#include "cpu/row_ops.h"

#include <ATen/ops/empty.h>

#include "cpu/checks.h"

namespace vaekern::cpu {

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

ColumnParam column_param(const at::Tensor& p, at::Tensor& keep) {
  if (!p.defined()) return {};
  keep = p.contiguous();
  return {keep.const_data_ptr(), keep.dim() == 0 ? 0 : 1};
}

void scale_rows_(ScaleRowsKernel kernel, const at::Tensor& grad, const std::vector<double>& scale,
                 const at::Tensor& input, const at::Tensor& target, double grad_scale, const at::Tensor& param) {
  bool all_one = true;
  for (double s : scale) all_one = all_one && s == 1.0;
  if (all_one || grad.numel() == 0) return;
  TORCH_CHECK(is_float(grad.scalar_type()), "vaekern (cpu): the saved gradient must be floating, got ",
              grad.scalar_type());
  at::Tensor g = grad.is_contiguous() ? grad : grad.contiguous();
  const int64_t rows = g.size(0), cols = row_len(g), chunks = num_chunks(cols);
  ScaleRowsArgs args{g.mutable_data_ptr(), g.scalar_type(), scale.data(), rows, cols, chunks};
  at::Tensor x, t, p;  // kept alive through the launch
  if (g.scalar_type() == at::kHalf) {
    check_target(target, input);
    TORCH_CHECK(input.sizes() == grad.sizes() && input.scalar_type() == grad.scalar_type(),
                "vaekern (cpu): the saved gradient has shape ", grad.sizes(), " and dtype ", grad.scalar_type(),
                " but its input has shape ", input.sizes(), " and dtype ", input.scalar_type());
    x = input.contiguous();
    t = target.contiguous();
    args.input = x.const_data_ptr();
    args.target = t.const_data_ptr();
    args.target_dtype = t.scalar_type();
    args.grad_scale = grad_scale;
    args.param = column_param(param, p);
  }
  at::parallel_for(0, rows * chunks, 4 * grain(std::min(cols, kChunk)),
                   [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  if (!g.is_same(grad)) grad.copy_(g);
}

}  // namespace vaekern::cpu
