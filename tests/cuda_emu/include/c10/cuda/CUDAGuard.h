// Stand-in for c10/cuda/CUDAGuard.h in the CUDA emulation (tests/cuda_emu/vkemu.h): one device.
#pragma once
#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
