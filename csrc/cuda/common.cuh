// Launch helpers shared by the CUDA kernels of gatesim (quantize_cuda.cu, update_cuda.cu).
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace gatesim {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// A grid of at most `cap` blocks per multiprocessor for `work` threads' worth of work;
// the kernels loop (grid-stride), so capping only trades blocks for iterations.
inline int grid_for(int64_t work, int cap_per_sm = 16) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t g = (work + kThreads - 1) / kThreads;
  const int64_t cap = sms * cap_per_sm;
  g = g < 1 ? 1 : (g > cap ? cap : g);
  return static_cast<int>(g);
}

// Blocks of kThreads threads of `Kernel` that fit on one multiprocessor at once, asked
// once per kernel (per process: gatesim assumes one GPU model per process).
template <auto Kernel>
int resident_blocks() {
  static const int b = [] {
    int r = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r, Kernel, kThreads, 0));
    return r > 0 ? r : 1;
  }();
  return b;
}

// A grid of at most `want` blocks that the device runs in one wave (kernels that loop).
template <auto Kernel>
int one_wave_grid(int64_t want) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t cap = sms * resident_blocks<Kernel>();
  return static_cast<int>(want < 1 ? 1 : (want < cap ? want : cap));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

#define GS_GRID_STRIDE(i, n)                                                              \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

}  // namespace cuda
}  // namespace gatesim
