// Allocation of the image-sized outputs of csrc/cpu (the gradients that forward writes).
#pragma once

#include <ATen/core/Tensor.h>

namespace vaekern::cpu {

// at::empty, except that a large buffer is put on transparent huge pages (Linux): a fresh
// 4096x3072 float32 buffer costs 32 ms of 4 KiB page faults on first write on the 2-core
// EPYC VM where the kernels were tuned, 3 ms on 2 MiB pages (its whole fused forward is
// about 15 ms). PyTorch does the same for every allocation under THP_MEM_ALLOC_ENABLE=1.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace vaekern::cpu
