// likelihood_rows (likelihood.h): the (row, chunk) task grid of a likelihood term, and the
// fixed-order sum of each row's partials.
#include "cpu/likelihood.h"

#include "cpu/row_ops.h"

namespace vaekern::cpu {

std::vector<double> likelihood_rows(LikelihoodKernel kernel, const at::Tensor& input_, const at::Tensor& target_,
                                    double grad_scale, const at::Tensor& grad, c10::ScalarType acc,
                                    const at::Tensor& param) {
  const at::Tensor input = input_.contiguous();
  const at::Tensor target = target_.contiguous();
  const int64_t rows = input.size(0), cols = row_len(input);
  const int64_t chunks = num_chunks(cols);
  std::vector<double> partials(rows * chunks);
  LikelihoodArgs args{input.const_data_ptr(), input.scalar_type(), target.const_data_ptr(),
                      target.scalar_type(), grad.defined() ? grad.mutable_data_ptr() : nullptr,
                      partials.data(), rows, cols, chunks, grad_scale, acc};
  at::Tensor param_keep;
  args.param = column_param(param, param_keep);
  at::parallel_for(0, rows * chunks, grain(std::min(cols, kChunk)),
                   [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  std::vector<double> out(rows, 0.0);
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t c = 0; c < chunks; ++c) out[b] += partials[b * chunks + c];
  }
  return out;
}

}  // namespace vaekern::cpu
