// CUDA kernels of quantize, ulp, absorbed and random_bits. The rounding and random-number
// logic is that of the host/device headers (gatesim/*.h) the CPU kernels use, so both
// backends give the same bits for the same inputs, seed and offset.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.cuh"
#include "format_check.h"
#include "gatesim/philox.h"
#include "gatesim/rounding.h"
#include "gatesim/update.h"
#include "op_checks.h"

namespace gatesim {
namespace cuda {
namespace {

// The rounding of one value as a functor taking the value's fp32 bits and its random
// word (ignored outside stochastic rounding): the general path, or the add-and-mask
// paths of the formats with fp32's exponent range (Spec::fast_ne: bf16, tf32).
template <int MODE, bool UNIFORM>
struct GeneralRound {
  static constexpr bool kRandom = MODE == kStochastic;
  Spec sp;
  __device__ uint32_t operator()(uint32_t v, uint32_t rnd) const {
    return round_bits<MODE, UNIFORM, uint32_t>(v, sp, rnd);
  }
};
struct FastNearestEven {
  static constexpr bool kRandom = false;
  int d;
  __device__ uint32_t operator()(uint32_t v, uint32_t) const { return round_ne_uniform(v, d); }
};
struct FastStochastic {
  static constexpr bool kRandom = true;
  Spec sp;
  __device__ uint32_t operator()(uint32_t v, uint32_t rnd) const { return round_sr_uniform(v, rnd, sp); }
};

// ---- the vectorized kernel (fp32 and bf16 outputs, 16-byte aligned buffers) ------------
// A warp rounds 256 consecutive elements per iteration: lane l loads elements 4l..4l+3 and
// 128+4l..128+4l+3 as two 16-byte loads and stores them as two 16-byte (fp32) or 8-byte
// (bf16) stores. (Measured on an H100: two groups per iteration, streaming cache hints and
// a one-wave grid were no faster.) Stochastic rounding (offset a multiple of 64, so the
// window starts a Philox block): each lane computes two Philox calls, i.e. the words of positions
// 64b + 16w + j for its (b, j), and a shared-memory transpose hands every lane the words
// of its own consecutive elements.
constexpr int kVecGroup = 256;

template <int ENC>
__device__ __forceinline__ void store4(void* y, int64_t q, const uint32_t (&o)[4]) {
  if (ENC == kEncF32) {
    reinterpret_cast<uint4*>(y)[q] = make_uint4(o[0], o[1], o[2], o[3]);
  } else {  // bf16: the high halves, element 0 in the low half (little endian)
    reinterpret_cast<uint2*>(y)[q] =
        make_uint2((o[0] >> 16) | (o[1] & 0xFFFF0000u), (o[2] >> 16) | (o[3] & 0xFFFF0000u));
  }
}

template <int ENC, class Round>
__global__ void __launch_bounds__(kThreads) quantize_vec_kernel(const uint4* __restrict__ x,
                                                                void* __restrict__ y,
                                                                int64_t ngroups, uint64_t seed,
                                                                uint64_t offset, Round round) {
  __shared__ uint32_t rbuf[Round::kRandom ? kWarps : 1][kVecGroup];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t wstride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kWarps + warp; g < ngroups; g += wstride) {
    const uint4 v0 = x[g * 64 + lane];
    const uint4 v1 = x[g * 64 + 32 + lane];
    uint4 r0 = make_uint4(0, 0, 0, 0), r1 = r0;
    if (Round::kRandom) {
      const uint64_t blk0 = (offset + static_cast<uint64_t>(g) * kVecGroup) >> 6;
      const uint32_t j = lane & 15;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint64_t blk = blk0 + 2 * h + (lane >> 4);
        const Philox4 q = philox_at(seed, (blk << 4) | j, 0);
        uint32_t* dst = &rbuf[warp][128 * h + 64 * (lane >> 4) + j];
#pragma unroll
        for (int w = 0; w < 4; ++w) dst[16 * w] = q.v[w];
      }
      __syncwarp();
      r0 = reinterpret_cast<const uint4*>(rbuf[warp])[lane];
      r1 = reinterpret_cast<const uint4*>(rbuf[warp])[32 + lane];
      __syncwarp();  // the next iteration overwrites rbuf
    }
    const uint32_t a[4] = {round(v0.x, r0.x), round(v0.y, r0.y), round(v0.z, r0.z), round(v0.w, r0.w)};
    const uint32_t b[4] = {round(v1.x, r1.x), round(v1.y, r1.y), round(v1.z, r1.z), round(v1.w, r1.w)};
    store4<ENC>(y, g * 64 + lane, a);
    store4<ENC>(y, g * 64 + 32 + lane, b);
  }
}

// ---- the general kernels (any encoding, alignment and offset; and the tails) -----------
// Each thread rounds kUnroll elements a grid-stride apart, loading all of them before
// computing: one element per thread leaves too few loads in flight to reach bandwidth.
constexpr int kUnroll = 8;

template <int ENC, class Round>
__global__ void quantize_kernel(const uint32_t* __restrict__ x, void* __restrict__ y, int64_t n,
                                Spec sp, Round round) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; base < n;
       base += kUnroll * stride) {
    uint32_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      v[u] = i < n ? x[i] : 0u;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < n) store_code<ENC>(y, i, round(v[u], 0u), sp);
    }
  }
}

// Stochastic rounding: one Philox call serves the four positions of its counter
// (positions 64b + 16w + j for w = 0..3, see gatesim/philox.h).
template <int ENC, class Round>
__global__ void quantize_sr_kernel(const uint32_t* __restrict__ x, void* __restrict__ y,
                                   int64_t n, Spec sp, uint64_t seed, uint64_t offset,
                                   int64_t ncounters, Round round) {
  const uint64_t b0 = offset >> 6;
  GS_GRID_STRIDE(k, ncounters) {
    const uint64_t blk = b0 + static_cast<uint64_t>(k >> 4);
    const uint64_t j = static_cast<uint64_t>(k & 15);
    const Philox4 r = philox_at(seed, (blk << 4) | j, 0);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint64_t p = (blk << 6) + 16u * w + j;
      if (p >= offset && p < offset + static_cast<uint64_t>(n)) {
        const int64_t i = static_cast<int64_t>(p - offset);
        store_code<ENC>(y, i, round(x[i], r.v[w]), sp);
      }
    }
  }
}

template <int ENC>
constexpr int code_bytes() {
  return ENC == kEncF32 ? 4 : (ENC == kEnc8 ? 1 : 2);
}

// Rounds x[0..n) into y with positions offset + i: the vectorized kernel over the whole
// 256-element groups where it applies, the general kernels over the rest.
template <int ENC, class Round>
void run_quantize(const uint32_t* x, void* y, int64_t n, const Spec& sp, uint64_t seed,
                  uint64_t offset, Round round, cudaStream_t st) {
  int64_t done = 0;
  const bool vec_ok = (ENC == kEncF32 || ENC == kEncHi16) && aligned16(x) && aligned16(y) &&
                      (!Round::kRandom || offset % 64 == 0);
  if (vec_ok && n >= kVecGroup) {
    const int64_t ngroups = n / kVecGroup;
    quantize_vec_kernel<ENC, Round><<<grid_for(ngroups * 32), kThreads, 0, st>>>(
        reinterpret_cast<const uint4*>(x), y, ngroups, seed, offset, round);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    done = ngroups * kVecGroup;
  }
  if (done == n) return;
  const int64_t rest = n - done;
  const uint32_t* xr = x + done;
  void* yr = static_cast<char*>(y) + done * code_bytes<ENC>();
  if (Round::kRandom) {
    const uint64_t o = offset + static_cast<uint64_t>(done);
    const int64_t blocks = static_cast<int64_t>(((o + rest - 1) >> 6) - (o >> 6) + 1);
    const int64_t nc = 16 * blocks;
    quantize_sr_kernel<ENC, Round><<<grid_for(nc), kThreads, 0, st>>>(xr, yr, rest, sp, seed, o, nc, round);
  } else {
    quantize_kernel<ENC, Round><<<grid_for((rest + kUnroll - 1) / kUnroll), kThreads, 0, st>>>(
        xr, yr, rest, sp, round);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool UNIFORM, int ENC>
void launch_quantize(const uint32_t* x, void* y, int64_t n, const Spec& sp, int mode,
                     uint64_t seed, uint64_t offset, cudaStream_t st) {
  constexpr bool kHiOrF32 = ENC == kEncF32 || ENC == kEncHi16;
  if (UNIFORM && kHiOrF32 && sp.fast_ne && mode == kNearestEven)
    return run_quantize<ENC>(x, y, n, sp, seed, offset, FastNearestEven{23 - sp.m}, st);
  if (UNIFORM && kHiOrF32 && sp.fast_ne && mode == kStochastic)
    return run_quantize<ENC>(x, y, n, sp, seed, offset, FastStochastic{sp}, st);
  switch (mode) {
#define GS_QUANTIZE_CASE(M) \
    case M: return run_quantize<ENC>(x, y, n, sp, seed, offset, GeneralRound<M, UNIFORM>{sp}, st);
    GS_QUANTIZE_CASE(kNearestEven)
    GS_QUANTIZE_CASE(kNearestAway)
    GS_QUANTIZE_CASE(kTowardZero)
    GS_QUANTIZE_CASE(kUp)
    GS_QUANTIZE_CASE(kDown)
    GS_QUANTIZE_CASE(kOdd)
    GS_QUANTIZE_CASE(kStochastic)
#undef GS_QUANTIZE_CASE
  }
}

void quantize_out_cuda(const at::Tensor& x, c10::IntArrayRef fmt, int64_t mode, int64_t seed,
                       int64_t offset, at::Tensor& out) {
  check_float_input(x, "x", at::kCUDA);
  check_mode(mode);
  check_stream(seed, offset, x.numel());
  const Spec sp = spec_from_list(fmt);
  TORCH_CHECK_VALUE(out.device() == x.device(), "out is on ", out.device(), ", x on ", x.device());
  TORCH_CHECK_VALUE(out.sizes() == x.sizes(), "out has shape ", out.sizes(), ", x has ", x.sizes());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous");
  const int enc = enc_for(out.scalar_type(), sp);
  const int64_t n = x.numel();
  if (n == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  const auto* xp = static_cast<const uint32_t*>(x.const_data_ptr());
  void* yp = out.mutable_data_ptr();
  const int m = static_cast<int>(mode);
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  if (sp.uniform) {
    switch (enc) {
      case kEncF32: return launch_quantize<true, kEncF32>(xp, yp, n, sp, m, s, o, st);
      case kEncHi16: return launch_quantize<true, kEncHi16>(xp, yp, n, sp, m, s, o, st);
      default: return launch_quantize<true, kEnc8>(xp, yp, n, sp, m, s, o, st);
    }
  }
  switch (enc) {
    case kEncF32: return launch_quantize<false, kEncF32>(xp, yp, n, sp, m, s, o, st);
    case kEnc16: return launch_quantize<false, kEnc16>(xp, yp, n, sp, m, s, o, st);
    default: return launch_quantize<false, kEnc8>(xp, yp, n, sp, m, s, o, st);
  }
}

at::Tensor quantize_cuda(const at::Tensor& x, c10::IntArrayRef fmt, int64_t mode, int64_t seed,
                         int64_t offset, at::ScalarType dtype) {
  check_float_input(x, "x", at::kCUDA);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  quantize_out_cuda(x, fmt, mode, seed, offset, out);
  return out;
}

// ---- ulp, absorbed, random bits -------------------------------------------------------
__global__ void ulp_kernel(const uint32_t* __restrict__ x, uint32_t* __restrict__ y, int64_t n,
                           Spec sp) {
  GS_GRID_STRIDE(i, n) { y[i] = ulp_bits(x[i], sp); }
}

__global__ void absorbed_kernel(const float* __restrict__ w, const float* __restrict__ dl,
                                bool* __restrict__ y, int64_t n, Spec sp, int mode,
                                uint64_t seed, uint64_t offset) {
  const int rcap = exact_sum_rcap(sp);
  GS_GRID_STRIDE(i, n) {
    const uint32_t rnd = mode == kStochastic ? random_word(seed, offset + static_cast<uint64_t>(i)) : 0u;
    const uint32_t r = round_any<false, uint64_t>(sum_to_odd(w[i], dl[i]), sp, mode, rnd, rcap);
    const uint32_t wb = f32_bits(w[i]);
    const bool same = r == wb || ((r | wb) & 0x7FFFFFFFu) == 0;
    const bool w_nan = (wb & 0x7FFFFFFFu) > 0x7F800000u;
    y[i] = dl[i] != 0.0f && !w_nan && same;
  }
}

__global__ void random_bits_kernel(uint32_t* __restrict__ y, int64_t n, uint64_t seed,
                                   uint64_t offset) {
  GS_GRID_STRIDE(i, n) { y[i] = random_word(seed, offset + static_cast<uint64_t>(i)); }
}

at::Tensor ulp_cuda(const at::Tensor& x, c10::IntArrayRef fmt) {
  check_float_input(x, "x", at::kCUDA);
  const Spec sp = spec_from_list(fmt);
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  c10::cuda::CUDAGuard guard(x.device());
  ulp_kernel<<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const uint32_t*>(x.const_data_ptr()),
      static_cast<uint32_t*>(out.mutable_data_ptr()), n, sp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor absorbed_cuda(const at::Tensor& w, const at::Tensor& delta, c10::IntArrayRef fmt,
                         int64_t mode, int64_t seed, int64_t offset) {
  check_float_input(w, "w", at::kCUDA);
  check_float_input(delta, "delta", at::kCUDA);
  TORCH_CHECK_VALUE(w.sizes() == delta.sizes(), "delta has shape ", delta.sizes(), ", w has ",
                    w.sizes());
  TORCH_CHECK_VALUE(w.device() == delta.device(), "delta is on ", delta.device(), ", w on ", w.device());
  check_mode(mode);
  check_stream(seed, offset, w.numel());
  const Spec sp = spec_from_list(fmt);
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kBool));
  const int64_t n = w.numel();
  if (n == 0) return out;
  c10::cuda::CUDAGuard guard(w.device());
  absorbed_kernel<<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      w.const_data_ptr<float>(), delta.const_data_ptr<float>(), out.mutable_data_ptr<bool>(), n,
      sp, static_cast<int>(mode), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void random_bits_out_cuda(at::Tensor& out, int64_t seed, int64_t offset) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kInt || out.scalar_type() == at::kUInt32,
                   "out must be int32 or uint32, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous");
  check_stream(seed, offset, out.numel());
  const int64_t n = out.numel();
  if (n == 0) return;
  c10::cuda::CUDAGuard guard(out.device());
  random_bits_kernel<<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<uint32_t*>(out.mutable_data_ptr()), n, static_cast<uint64_t>(seed),
      static_cast<uint64_t>(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(gatesim, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("quantize_out", &quantize_out_cuda);
  m.impl("ulp", &ulp_cuda);
  m.impl("absorbed", &absorbed_cuda);
  m.impl("random_bits_out", &random_bits_out_cuda);
}

}  // namespace cuda
}  // namespace gatesim
