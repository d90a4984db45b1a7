// The CUDA ops apply_update and adam_step (kernels in update_kernel.cuh), and the tree
// over the block masses.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.cuh"
#include "update_kernel.cuh"
#include "format_check.h"
#include "gatesim/philox.h"
#include "gatesim/rounding.h"
#include "gatesim/update.h"
#include "op_checks.h"

namespace gatesim {
namespace cuda {
namespace {

using upd::AdamSrc;
using upd::kBlock;
using upd::Launch;
using upd::MemDelta;
using upd::dispatch_fast;
using upd::dispatch_general;

// The same tree over the block masses, zero-padded to a power of two (the padding is
// implicit: the first level reads zeros past nreal; x + 0 = x for the masses, all >= +0).
__global__ void tree_kernel(double* __restrict__ a, int64_t nreal, int64_t padded,
                            double* __restrict__ out) {
  int64_t half = padded >> 1;
  if (half == 0) {
    if (threadIdx.x == 0) out[0] = a[0];
    return;
  }
  for (int64_t k = threadIdx.x; k < half; k += blockDim.x)
    a[k] = (k < nreal ? a[k] : 0.0) + (k + half < nreal ? a[k + half] : 0.0);
  __syncthreads();
  for (half >>= 1; half >= 1; half >>= 1) {
    for (int64_t k = threadIdx.x; k < half; k += blockDim.x) a[k] += a[k + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = a[0];
}

// Runs one update over call.n elements and returns (counts, mass) as the op does.
template <class Src>
std::tuple<at::Tensor, at::Tensor> run_update(const at::Tensor& param, const UpdateCall& call,
                                              bool stats, const Src& src) {
  c10::cuda::CUDAGuard guard(param.device());
  at::Tensor counts = at::zeros({kNumStats}, param.options().dtype(at::kLong));
  at::Tensor mass = at::zeros({1}, param.options().dtype(at::kDouble));
  const int64_t n = call.n;
  if (n == 0) return {counts, mass};
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  int64_t padded = 1;
  while (padded < nblocks) padded <<= 1;
  at::Tensor bmass = at::empty({stats ? padded : 1}, param.options().dtype(at::kDouble));
  Launch L;
  L.t = call.t;
  L.a = call.a;
  L.n = n;
  L.nblocks = nblocks;
  L.stats = stats;
  // (unsigned: CUDA has no signed 64-bit atomicAdd; counts are non-negative)
  L.counts = reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>());
  L.bm = bmass.mutable_data_ptr<double>();
  L.st = at::cuda::getCurrentCUDAStream();
  if (!dispatch_fast(L, call.path, call.enc, src)) dispatch_general(L, call.path, call.enc, src);
  if (stats) {
    tree_kernel<<<1, 1024, 0, L.st>>>(L.bm, nblocks, padded, mass.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {counts, mass};
}

std::tuple<at::Tensor, at::Tensor> apply_update_cuda(
    at::Tensor& param, const at::Tensor& delta, const std::optional<at::Tensor>& master,
    const std::optional<at::Tensor>& comp, c10::IntArrayRef fmt, int64_t mode, int64_t sum_mode,
    double alpha, double decay, int64_t seed, int64_t offset, int64_t step, bool stats) {
  const UpdateCall call = prepare_update(param, delta, master, comp, fmt, mode, sum_mode, alpha,
                                         decay, seed, offset, step, at::kCUDA);
  return run_update(param, call, stats, MemDelta{call.t.delta});
}

// One Adam/AdamW step of one parameter in one pass: the moments (torch's lerp_, mul_ and
// addcmul_), the direction (as gatesim.optim._direction) and apply_update's write with
// alpha = 1, statistics included. coef = [1 - beta1, beta2, 1 - beta2,
// sqrt(bias_correction2), eps, -step_size], each rounded to fp32 as torch rounds scalars.
std::tuple<at::Tensor, at::Tensor> adam_step_cuda(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
    const std::optional<at::Tensor>& master, const std::optional<at::Tensor>& comp,
    c10::IntArrayRef fmt, c10::IntArrayRef state_fmt, int64_t mode, int64_t sum_mode,
    c10::ArrayRef<double> coef, int64_t variant, double decay, int64_t seed, int64_t offset,
    int64_t step, bool stats) {
  const AdamCall c = prepare_adam(param, grad, exp_avg, exp_avg_sq, master, comp, fmt,
                                  state_fmt, mode, sum_mode, coef, variant, decay, seed, offset,
                                  step, at::kCUDA);
  return run_update(param, c.u, stats, AdamSrc{c.g, c.m, c.v, c.c});
}

}  // namespace

TORCH_LIBRARY_IMPL(gatesim, CUDA, m) {
  m.impl("apply_update", &apply_update_cuda);
  m.impl("adam_step", &adam_step_cuda);
}

}  // namespace cuda
}  // namespace gatesim
