// CUDA kernels of the gatesim ops. All rounding, random-number and update logic comes
// from the same host/device headers as the CPU backend (gatesim/*.h), so both give the
// same bits for the same inputs, seed and offset; the statistics are reduced in the same
// fixed order (integer counts with atomics; the absorbed mass by the fixed pairwise tree
// of gatesim::tree_sum within 4096-element blocks and then over blocks).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "format_check.h"
#include "gatesim/philox.h"
#include "gatesim/rounding.h"
#include "gatesim/update.h"
#include "op_checks.h"

namespace gatesim {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kBlock = 4096;  // elements per statistics block (as on the CPU)

int grid_for(int64_t work) {
  const int64_t g = (work + kThreads - 1) / kThreads;
  return static_cast<int>(g < 1 ? 1 : (g > (int64_t{1} << 20) ? (int64_t{1} << 20) : g));
}

#define GS_GRID_STRIDE(i, n)                                                        \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// ---- quantize ---------------------------------------------------------------------
// Each thread rounds kUnroll elements a grid-stride apart, loading all of them before
// computing: one element per thread leaves too few loads in flight to reach bandwidth.
constexpr int kUnroll = 8;

int grid_for_unrolled(int64_t n) { return grid_for((n + kUnroll - 1) / kUnroll); }

// The rounding of one value, as a functor: the general path, or the nearest_even fast
// path of uniform formats (Spec::fast_ne).
template <int MODE, bool UNIFORM>
struct GeneralRound {
  Spec sp;
  __device__ uint32_t operator()(uint32_t v) const { return round_bits<MODE, UNIFORM, uint32_t>(v, sp, 0u); }
};
struct FastNearestEven {
  int d;
  __device__ uint32_t operator()(uint32_t v) const { return round_ne_uniform(v, d); }
};

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
      if (i < n) store_code<ENC>(y, i, round(v[u]), sp);
    }
  }
}

// Stochastic rounding: one Philox call serves the four positions of its counter
// (positions 64b + 16w + j for w = 0..3, see gatesim/philox.h).
template <bool UNIFORM, int ENC>
__global__ void quantize_sr_kernel(const uint32_t* __restrict__ x, void* __restrict__ y,
                                   int64_t n, Spec sp, uint64_t seed, uint64_t offset,
                                   int64_t ncounters) {
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
        store_code<ENC>(y, i, round_bits<kStochastic, UNIFORM, uint32_t>(x[i], sp, r.v[w]), sp);
      }
    }
  }
}

template <bool UNIFORM, int ENC>
void launch_quantize(const uint32_t* x, void* y, int64_t n, const Spec& sp, int mode,
                     uint64_t seed, uint64_t offset, cudaStream_t st) {
  const int g = grid_for_unrolled(n);
  if (UNIFORM && mode == kNearestEven && sp.fast_ne && (ENC == kEncF32 || ENC == kEncHi16)) {
    quantize_kernel<ENC><<<g, kThreads, 0, st>>>(x, y, n, sp, FastNearestEven{23 - sp.m});
    return;
  }
  switch (mode) {
#define GS_QUANTIZE_CASE(M) \
    case M: quantize_kernel<ENC><<<g, kThreads, 0, st>>>(x, y, n, sp, GeneralRound<M, UNIFORM>{sp}); break;
    GS_QUANTIZE_CASE(kNearestEven)
    GS_QUANTIZE_CASE(kNearestAway)
    GS_QUANTIZE_CASE(kTowardZero)
    GS_QUANTIZE_CASE(kUp)
    GS_QUANTIZE_CASE(kDown)
    GS_QUANTIZE_CASE(kOdd)
#undef GS_QUANTIZE_CASE
    default: {
      const int64_t blocks = static_cast<int64_t>(((offset + n - 1) >> 6) - (offset >> 6) + 1);
      const int64_t nc = 16 * blocks;
      quantize_sr_kernel<UNIFORM, ENC><<<grid_for(nc), kThreads, 0, st>>>(x, y, n, sp, seed, offset, nc);
    }
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
      case kEncF32: launch_quantize<true, kEncF32>(xp, yp, n, sp, m, s, o, st); break;
      case kEncHi16: launch_quantize<true, kEncHi16>(xp, yp, n, sp, m, s, o, st); break;
      default: launch_quantize<true, kEnc8>(xp, yp, n, sp, m, s, o, st); break;
    }
  } else {
    switch (enc) {
      case kEncF32: launch_quantize<false, kEncF32>(xp, yp, n, sp, m, s, o, st); break;
      case kEnc16: launch_quantize<false, kEnc16>(xp, yp, n, sp, m, s, o, st); break;
      default: launch_quantize<false, kEnc8>(xp, yp, n, sp, m, s, o, st); break;
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// ---- apply_update -------------------------------------------------------------------------
// One CUDA block per 4096-element statistics block; thread t handles elements t, t + 256, ...
template <int MODE, bool UNIFORM, int PATH, int ENC, bool STATS>
__global__ void __launch_bounds__(kThreads) update_kernel(UpdatePtrs t, UpdateArgs a, int64_t n,
                                                          unsigned long long* __restrict__ counts,
                                                          double* __restrict__ block_mass) {
  __shared__ double smass[kBlock];
  __shared__ unsigned int shist[kHistBins];
  __shared__ unsigned int sflags[7];
  const int64_t blk0 = static_cast<int64_t>(blockIdx.x) * kBlock;
  if (STATS) {
    for (int k = threadIdx.x; k < kHistBins; k += blockDim.x) shist[k] = 0;
    if (threadIdx.x < 7) sflags[threadIdx.x] = 0;
    __syncthreads();
  }
  unsigned int c[7] = {0, 0, 0, 0, 0, 0, 0};
  const bool sr = a.mode == kStochastic;
  const uint64_t xkeep = a.decay == 1.0f ? 0ull : ~0ull;
  const double alpha_d = a.alpha, decay_m1 = static_cast<double>(a.decay) - 1.0;
  constexpr int kPer = kBlock / kThreads;  // 16 elements per thread, 256 apart
  // Load phase: every load of the thread is issued before any computation.
  uint32_t po[kPer];
  float dv[kPer], mv[kPer];
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int64_t i = blk0 + threadIdx.x + r * kThreads;
    const bool in = i < n;
    po[r] = in ? load_code<ENC>(t.param, i, a.sp) : 0u;
    dv[r] = in ? t.delta[i] : 0.0f;
    mv[r] = (in && PATH == kMaster) ? t.master[i] : 0.0f;
  }
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int k = threadIdx.x + r * kThreads;
    const int64_t i = blk0 + k;
    const bool in = i < n;
    double mass = 0.0;
    int bin = -1;
    if (in) {
      const uint64_t pos = a.offset + static_cast<uint64_t>(i);
      const uint32_t r1 = sr ? random_word(a.seed, pos, 2 * a.step + 1) : 0u;
      const uint32_t r0 = (sr && PATH != kMaster) ? random_word(a.seed, pos, 2 * a.step) : 0u;
      const float p = bits_f32(po[r]);
      const float d = dv[r];
      uint32_t pn;
      uint32_t differs = 0;
      double x;
      if (PATH == kMaster) {
        const float m2 = fma32(a.alpha, d, mul32(mv[r], a.decay));
        t.master[i] = m2;
        pn = (MODE == kNearestEven && UNIFORM && a.sp.fast_ne)
                 ? round_ne_uniform(f32_bits(m2), 23 - a.sp.m)
                 : round_m<MODE, UNIFORM, uint32_t>(f32_bits(m2), a.sp, a.mode, r1);
        x = mv[r];
      } else if (PATH == kKahan) {
        const float cc = bits_f32(load_code<ENC>(t.comp, i, a.spc));
        uint32_t cn;
        kahan_step<MODE, UNIFORM>(p, cc, d, a, r0, r1, pn, cn);
        store_code<ENC>(t.comp, i, cn, a.spc);
        x = p;
      } else {
        pn = storage_step<MODE, UNIFORM>(p, d, a, a.sum_mode, r0, r1);
        if (STATS) differs = storage_step<MODE, UNIFORM>(p, d, a, 1 - a.sum_mode, r0, r1) != pn;
        x = p;
      }
      store_code<ENC>(t.param, i, pn, a.sp);
      if (STATS) {
        const double u = alpha_d * d + decay_m1 * bits_f64(f64_bits(x) & xkeep);
        const uint32_t f = element_flags(po[r], pn, f32_bits(d), u, differs);
#pragma unroll
        for (int q = 0; q < 7; ++q) c[q] += (f >> q) & 1u;
        bin = element_bin(po[r], u, a.sp.emin, a.sp.m, a.sp.msub);
        mass = ((f >> 1) & 1u) ? fabs(u) : 0.0;
      }
    }
    if (STATS) {
      smass[k] = mass;
      // warp-aggregated histogram: one shared atomic per distinct bin in the warp
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin);
      if (bin >= 0 && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&shist[bin], __popc(peers));
    }
  }
  if (!STATS) return;
#pragma unroll
  for (int q = 0; q < 7; ++q) {
    unsigned int v = c[q];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, off);
    if ((threadIdx.x & 31) == 0 && v) atomicAdd(&sflags[q], v);
  }
  __syncthreads();
  // the fixed pairwise tree of tree_sum: a[k] += a[k + half]
  for (int half = kBlock / 2; half >= 1; half >>= 1) {
    for (int k = threadIdx.x; k < half; k += blockDim.x) smass[k] += smass[k + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    block_mass[blockIdx.x] = smass[0];
    const int64_t len = (n - blk0) < kBlock ? (n - blk0) : kBlock;
    atomicAdd(&counts[kStatN], static_cast<unsigned long long>(len));
    for (int q = 0; q < 7; ++q) {
      if (sflags[q]) atomicAdd(&counts[kStatChanged + q], static_cast<unsigned long long>(sflags[q]));
    }
  }
  for (int k = threadIdx.x; k < kHistBins; k += blockDim.x) {
    if (shist[k]) atomicAdd(&counts[kStatHist0 + k], static_cast<unsigned long long>(shist[k]));
  }
}

// The same tree over the (zero-padded, power-of-two) block masses, in one block.
__global__ void tree_kernel(double* __restrict__ a, int64_t n, double* __restrict__ out) {
  for (int64_t half = n >> 1; half >= 1; half >>= 1) {
    for (int64_t k = threadIdx.x; k < half; k += blockDim.x) a[k] += a[k + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = n > 0 ? a[0] : 0.0;
}

template <int MODE, bool UNIFORM, int PATH, int ENC>
void launch_update(const UpdatePtrs& t, const UpdateArgs& a, int64_t n, bool stats,
                   unsigned long long* counts, double* bm, int64_t nblocks, cudaStream_t st) {
  if (stats)
    update_kernel<MODE, UNIFORM, PATH, ENC, true><<<nblocks, kThreads, 0, st>>>(t, a, n, counts, bm);
  else
    update_kernel<MODE, UNIFORM, PATH, ENC, false><<<nblocks, kThreads, 0, st>>>(t, a, n, counts, bm);
}

template <int PATH>
void launch_generic(const UpdatePtrs& t, const UpdateArgs& a, int enc, int64_t n, bool stats,
                    unsigned long long* counts, double* bm, int64_t nblocks, cudaStream_t st) {
  switch (enc) {
    case kEncF32: return launch_update<-1, false, PATH, kEncF32>(t, a, n, stats, counts, bm, nblocks, st);
    case kEncHi16: return launch_update<-1, false, PATH, kEncHi16>(t, a, n, stats, counts, bm, nblocks, st);
    case kEnc16: return launch_update<-1, false, PATH, kEnc16>(t, a, n, stats, counts, bm, nblocks, st);
    default: return launch_update<-1, false, PATH, kEnc8>(t, a, n, stats, counts, bm, nblocks, st);
  }
}

std::tuple<at::Tensor, at::Tensor> apply_update_cuda(
    at::Tensor& param, const at::Tensor& delta, const std::optional<at::Tensor>& master,
    const std::optional<at::Tensor>& comp, c10::IntArrayRef fmt, int64_t mode, int64_t sum_mode,
    double alpha, double decay, int64_t seed, int64_t offset, int64_t step, bool stats) {
  const UpdateCall call = prepare_update(param, delta, master, comp, fmt, mode, sum_mode, alpha,
                                         decay, seed, offset, step, at::kCUDA);
  const UpdatePtrs& t = call.t;
  const UpdateArgs& a = call.a;
  const Spec& sp = a.sp;
  const int path = call.path, enc = call.enc;
  const int64_t n = call.n;
  c10::cuda::CUDAGuard guard(param.device());
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  at::Tensor counts = at::zeros({kNumStats}, param.options().dtype(at::kLong));
  at::Tensor mass = at::zeros({1}, param.options().dtype(at::kDouble));
  if (n == 0) return {counts, mass};
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  int64_t padded = 1;
  while (padded < nblocks) padded <<= 1;
  at::Tensor bmass = at::zeros({stats ? padded : 1}, param.options().dtype(at::kDouble));
  // (unsigned: CUDA has no signed 64-bit atomicAdd; counts are non-negative)
  auto* cp = reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>());
  double* bm = bmass.mutable_data_ptr<double>();
  if (path == kMaster && sp.uniform && (enc == kEncHi16 || enc == kEncF32) &&
      (mode == kNearestEven || mode == kStochastic)) {
    if (enc == kEncHi16) {
      if (mode == kNearestEven) launch_update<kNearestEven, true, kMaster, kEncHi16>(t, a, n, stats, cp, bm, nblocks, st);
      else launch_update<kStochastic, true, kMaster, kEncHi16>(t, a, n, stats, cp, bm, nblocks, st);
    } else {
      if (mode == kNearestEven) launch_update<kNearestEven, true, kMaster, kEncF32>(t, a, n, stats, cp, bm, nblocks, st);
      else launch_update<kStochastic, true, kMaster, kEncF32>(t, a, n, stats, cp, bm, nblocks, st);
    }
  } else if (path == kMaster) {
    launch_generic<kMaster>(t, a, enc, n, stats, cp, bm, nblocks, st);
  } else if (path == kKahan) {
    launch_generic<kKahan>(t, a, enc, n, stats, cp, bm, nblocks, st);
  } else {
    launch_generic<kStorage>(t, a, enc, n, stats, cp, bm, nblocks, st);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (stats) {
    tree_kernel<<<1, 1024, 0, st>>>(bm, padded, mass.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {counts, mass};
}

}  // namespace

TORCH_LIBRARY_IMPL(gatesim, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("quantize_out", &quantize_out_cuda);
  m.impl("ulp", &ulp_cuda);
  m.impl("absorbed", &absorbed_cuda);
  m.impl("random_bits_out", &random_bits_out_cuda);
  m.impl("apply_update", &apply_update_cuda);
}

}  // namespace cuda
}  // namespace gatesim
