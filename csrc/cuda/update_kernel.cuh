// The apply_update kernel and its launchers, shared by the translation units that
// instantiate them (update_*.cu: one per delta source and kernel family, so that nvcc
// compiles them in parallel; a single file took 5 minutes to build on 16 cores). The
// update arithmetic and the statistics are those of gatesim/update.h, which the CPU
// kernels use too; the statistics are reduced in the same fixed order as on the CPU
// (integer counts in any order; the absorbed mass by the fixed pairwise tree of
// gatesim::tree_sum within 4096-element blocks and then over blocks).
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "common.cuh"
#include "gatesim/adam.h"
#include "gatesim/philox.h"
#include "gatesim/rounding.h"
#include "gatesim/update.h"

namespace gatesim {
namespace cuda {
namespace upd {

constexpr int64_t kBlock = 4096;             // elements per statistics block (as on the CPU)
constexpr int kPer = kBlock / kThreads;      // elements per thread per block, kThreads apart
constexpr int kHistWords = (kHistBins + 3) / 4;
constexpr int kFlushEvery = 8;               // blocks between flushes of the byte counters

// Where the update comes from: a delta in memory (apply_update), or Adam's direction
// computed from the gradient and the moments, which are updated on the way (adam_step).
struct MemDelta {
  static constexpr bool kAdam = false;
  const float* d;
};

struct AdamSrc {
  static constexpr bool kAdam = true;
  const float* g;
  float* m;
  float* v;
  AdamCoef c;  // coefficients and the variant of torch's formulas (gatesim/adam.h)
};

// The moments of element i (written back) and its step direction. The sqrt is the IEEE
// one (torch's CUDA sqrt is too; kAdamTorchSqrt is a CPU matter).
__device__ __forceinline__ float adam_delta(const AdamSrc& s, int64_t i, float g, float m,
                                            float v) {
  adam_moments(s.c, g, m, v);
  s.m[i] = m;
  s.v[i] = v;
  return adam_direction_any(m, __fsqrt_rn(v), s.c);
}

// Kinds of kernels: the general one, and the fast paths the CPU has too (same functions).
enum Kind : int {
  kGeneral = 0,     // MODE < 0 (read at run time), any format and path
  kFp32Ne = 1,      // storage-only in FP32 itself, nearest even: hardware rounding
  kNarrowNe = 2,    // storage-only, nearest even, <= 21 mantissa bits: exact sum via fp32 odd
  kFastMaster = 3,  // master path, Spec::fast_ne (bf16, tf32), nearest even or stochastic
};

// The per-lane byte counters of one warp go into the block's histogram: bytes are summed
// across the warp in 16-bit fields (at most 32 * 16 * kFlushEvery = 4096 per field).
__device__ __forceinline__ void flush_hist(uint32_t (*hl)[32], unsigned int* shist, int lane) {
#pragma unroll
  for (int w = 0; w < kHistWords; ++w) {
    const uint32_t v = hl[w][lane];
    hl[w][lane] = 0;
    const uint32_t even = __reduce_add_sync(0xFFFFFFFFu, v & 0x00FF00FFu);
    const uint32_t odd = __reduce_add_sync(0xFFFFFFFFu, (v >> 8) & 0x00FF00FFu);
    if (lane == 0) {
      const uint32_t c[4] = {even & 0xFFFFu, odd & 0xFFFFu, even >> 16, odd >> 16};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (4 * w + q < kHistBins && c[q]) atomicAdd(&shist[4 * w + q], c[q]);
      }
    }
  }
}

// One CUDA block works through statistics blocks blockIdx.x, + gridDim.x, ...; thread t
// handles elements t + 256 r (r = 0..15) of each, in two chunks r = c, c + 2, ..., c + 14:
// eight elements' loads in flight per thread, and few enough registers that three blocks
// share a multiprocessor, so their loads overlap each other's arithmetic. (One block with
// all 16 elements in flight cannot keep the memory busy while it computes; four chunks of
// four left too few bytes in flight: 0.65 of copy bandwidth on an H100.)
template <int MODE, bool UNIFORM, int PATH, int ENC, int KIND, class Src>
__global__ void __launch_bounds__(kThreads, 3) update_kernel(
    UpdatePtrs t, UpdateArgs a, Src src, int64_t n, int64_t nblocks, bool stats,
    unsigned long long* __restrict__ counts, double* __restrict__ block_mass) {
  __shared__ uint32_t hist_lane[kWarps][kHistWords][32];  // per-lane byte counters
  __shared__ double red[kThreads];
  __shared__ unsigned int shist[kHistBins];
  __shared__ unsigned long long sflags[7];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (stats) {
    for (int w = 0; w < kHistWords; ++w) hist_lane[warp][w][lane] = 0;
    for (int k = threadIdx.x; k < kHistBins; k += kThreads) shist[k] = 0;
    if (threadIdx.x < 7) sflags[threadIdx.x] = 0;
    __syncthreads();
  }
  unsigned int c[7] = {0, 0, 0, 0, 0, 0, 0};
  const bool sr = MODE >= 0 ? MODE == kStochastic : a.mode == kStochastic;
  const uint64_t xkeep = a.decay == 1.0f ? 0ull : ~0ull;
  const double alpha_d = a.alpha, decay_m1 = static_cast<double>(a.decay) - 1.0;
  const uint32_t exact = a.sum_mode == kSumExact ? 1u : 0u;
  int since_flush = 0;
  for (int64_t blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
    const int64_t blk0 = blk * kBlock;
    constexpr int kChunks = 2, kQ = kPer / kChunks;
    double tc[kChunks];  // the chunks' partial masses
#pragma unroll
    for (int ch = 0; ch < kChunks; ++ch) {
      uint32_t po[kQ];
      float s0[kQ], s1[kQ], s2[kQ], mv[kQ];
#pragma unroll
      for (int q = 0; q < kQ; ++q) {
        const int64_t i = blk0 + threadIdx.x + (ch + kChunks * q) * kThreads;
        const bool in = i < n;
        po[q] = in ? load_code<ENC>(t.param, i, a.sp) : 0u;
        if constexpr (Src::kAdam) {
          s0[q] = in ? src.g[i] : 0.0f;
          s1[q] = in ? src.m[i] : 0.0f;
          s2[q] = in ? src.v[i] : 0.0f;
        } else {
          s0[q] = in ? src.d[i] : 0.0f;
          s1[q] = s2[q] = 0.0f;
        }
        mv[q] = (in && PATH == kMaster) ? t.master[i] : 0.0f;
      }
      double mass[kQ];
#pragma unroll
      for (int q = 0; q < kQ; ++q) {
        const int64_t i = blk0 + threadIdx.x + (ch + kChunks * q) * kThreads;
        mass[q] = 0.0;
        if (i >= n) continue;
        const uint64_t pos = a.offset + static_cast<uint64_t>(i);
        const uint32_t r1 = sr ? random_word(a.seed, pos, 2 * a.step + 1) : 0u;
        const uint32_t r0 = (sr && PATH != kMaster) ? random_word(a.seed, pos, 2 * a.step) : 0u;
        const float p = bits_f32(po[q]);
        float d;
        if constexpr (Src::kAdam) d = adam_delta(src, i, s0[q], s1[q], s2[q]);
        else d = s0[q];
        uint32_t pn;
        uint32_t differs = 0;
        double x;
        if (PATH == kMaster) {
          const float m2 = fma32(a.alpha, d, mul32(mv[q], a.decay));
          t.master[i] = m2;
          if (KIND == kFastMaster)
            pn = MODE == kNearestEven ? round_ne_uniform(f32_bits(m2), 23 - a.sp.m)
                                      : round_sr_uniform(f32_bits(m2), r1, a.sp);
          else
            pn = round_m<MODE, UNIFORM, uint32_t>(f32_bits(m2), a.sp, a.mode, r1);
          x = mv[q];
        } else if (PATH == kKahan) {
          const float cc = bits_f32(load_code<ENC>(t.comp, i, a.spc));
          uint32_t cn;
          kahan_step<MODE, UNIFORM>(p, cc, d, a, r0, r1, pn, cn);
          store_code<ENC>(t.comp, i, cn, a.spc);
          x = p;
        } else if (KIND == kFp32Ne || KIND == kNarrowNe) {
          uint32_t pe, pf;
          if (KIND == kFp32Ne) {
            pe = storage_exact_fp32_ne(p, d, a.decay, a.alpha);
            pf = storage_fp32_fp32_ne(p, d, a.decay, a.alpha);
          } else {
            pe = round_m<MODE, UNIFORM, uint32_t>(exact_sum_odd32(p, d, a.decay, a.alpha), a.sp,
                                                  a.mode, 0u);
            pf = storage_step<MODE, UNIFORM>(p, d, a, kSumFp32, 0u, 0u);
          }
          pn = blend(pf, pe, exact);
          differs = pe != pf ? 1u : 0u;
          x = p;
        } else {
          pn = storage_step<MODE, UNIFORM>(p, d, a, a.sum_mode, r0, r1);
          if (stats) differs = storage_step<MODE, UNIFORM>(p, d, a, 1 - a.sum_mode, r0, r1) != pn;
          x = p;
        }
        store_code<ENC>(t.param, i, pn, a.sp);
        if (stats) {
          const double u = alpha_d * d + decay_m1 * bits_f64(f64_bits(x) & xkeep);
          const uint32_t f = element_flags(po[q], pn, f32_bits(d), u, differs);
#pragma unroll
          for (int k = 0; k < 7; ++k) c[k] += (f >> k) & 1u;
          const int bin = element_bin(po[q], u, a.sp.emin, a.sp.m, a.sp.msub);
          if (bin >= 0) hist_lane[warp][bin >> 2][lane] += 1u << (8 * (bin & 3));
          mass[q] = ((f >> 1) & 1u) ? fabs(u) : 0.0;
        }
      }
      // tree levels 2048 (r, r + 8: q, q + 4), 1024 (r, r + 4: q, q + 2) and 512
      // (r, r + 2: q, q + 1)
      double s4[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) s4[q] = mass[q] + mass[q + 4];
      s4[0] += s4[2];
      s4[1] += s4[3];
      tc[ch] = s4[0] + s4[1];
    }
    if (!stats) continue;
    // The block's mass by the fixed tree of tree_sum (a[k] += a[k + half], half = 2048 ..
    // 1; element k = threadIdx.x + 256 r): levels 2048..256 pair a thread's own elements
    // (above, and 256: the two chunks), 128..32 pair warps (through shared memory), 16..1
    // lanes (shuffles).
    red[threadIdx.x] = tc[0] + tc[1];
    __syncthreads();
    if (warp == 0) {
      double v[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) v[q] = red[lane + 32 * q];
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] += v[q + 4];  // half = 128
      v[0] += v[2];                                   // half = 64
      v[1] += v[3];
      double s = v[0] + v[1];                         // half = 32
#pragma unroll
      for (int h = 16; h >= 1; h >>= 1) s += __shfl_down_sync(0xFFFFFFFFu, s, h);
      if (lane == 0) block_mass[blk] = s;
    }
    __syncthreads();  // red is written again for the next block
    if (++since_flush == kFlushEvery) {
      flush_hist(hist_lane[warp], shist, lane);
      since_flush = 0;
    }
  }
  if (!stats) return;
  flush_hist(hist_lane[warp], shist, lane);
#pragma unroll
  for (int q = 0; q < 7; ++q) {
    const unsigned int v = __reduce_add_sync(0xFFFFFFFFu, c[q]);
    if (lane == 0 && v) atomicAdd(&sflags[q], static_cast<unsigned long long>(v));
  }
  __syncthreads();
  if (threadIdx.x < 7 && sflags[threadIdx.x])
    atomicAdd(&counts[kStatChanged + threadIdx.x], sflags[threadIdx.x]);
  if (threadIdx.x < kHistBins && shist[threadIdx.x])
    atomicAdd(&counts[kStatHist0 + threadIdx.x], static_cast<unsigned long long>(shist[threadIdx.x]));
  if (blockIdx.x == 0 && threadIdx.x == 0)
    atomicAdd(&counts[kStatN], static_cast<unsigned long long>(n));
}

struct Launch {
  UpdatePtrs t;
  UpdateArgs a;
  int64_t n, nblocks;
  bool stats;
  unsigned long long* counts;
  double* bm;
  cudaStream_t st;
};

template <int MODE, bool UNIFORM, int PATH, int ENC, int KIND, class Src>
void launch(const Launch& L, const Src& src) {
  // As many blocks as run at once (each loops over statistics blocks).
  constexpr auto k = update_kernel<MODE, UNIFORM, PATH, ENC, KIND, Src>;
  k<<<one_wave_grid<k>(L.nblocks), kThreads, 0, L.st>>>(L.t, L.a, src, L.n, L.nblocks, L.stats,
                                                       L.counts, L.bm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int PATH, class Src>
void launch_generic(const Launch& L, int enc, const Src& src) {
  switch (enc) {
    case kEncF32: return launch<-1, false, PATH, kEncF32, kGeneral>(L, src);
    case kEncHi16: return launch<-1, false, PATH, kEncHi16, kGeneral>(L, src);
    case kEnc16: return launch<-1, false, PATH, kEnc16, kGeneral>(L, src);
    default: return launch<-1, false, PATH, kEnc8, kGeneral>(L, src);
  }
}

// The fast paths where they apply (the same conditions as the CPU's apply_update_range);
// false if none does.
template <class Src>
bool dispatch_fast(const Launch& L, int path, int enc, const Src& src) {
  const Spec& sp = L.a.sp;
  const int mode = L.a.mode;
  const bool ne = mode == kNearestEven;
  if (path == kMaster && sp.fast_ne && (enc == kEncHi16 || enc == kEncF32) &&
      (ne || mode == kStochastic)) {
    if (enc == kEncHi16 && ne) launch<kNearestEven, true, kMaster, kEncHi16, kFastMaster>(L, src);
    else if (enc == kEncHi16) launch<kStochastic, true, kMaster, kEncHi16, kFastMaster>(L, src);
    else if (ne) launch<kNearestEven, true, kMaster, kEncF32, kFastMaster>(L, src);
    else launch<kStochastic, true, kMaster, kEncF32, kFastMaster>(L, src);
    return true;
  }
  if (path != kStorage || !ne) return false;
  const bool fp32 = sp.uniform && sp.m == 23 && sp.has_inf && !sp.nan_all_ones && !sp.saturate;
  if (enc == kEncF32 && fp32) {
    launch<kNearestEven, true, kStorage, kEncF32, kFp32Ne>(L, src);
    return true;
  }
  if (sp.m > 21) return false;
  if (sp.uniform && enc == kEncF32) launch<kNearestEven, true, kStorage, kEncF32, kNarrowNe>(L, src);
  else if (sp.uniform && enc == kEncHi16) launch<kNearestEven, true, kStorage, kEncHi16, kNarrowNe>(L, src);
  else if (!sp.uniform && enc == kEncF32) launch<kNearestEven, false, kStorage, kEncF32, kNarrowNe>(L, src);
  else if (!sp.uniform && enc == kEnc16) launch<kNearestEven, false, kStorage, kEnc16, kNarrowNe>(L, src);
  else if (!sp.uniform && enc == kEnc8) launch<kNearestEven, false, kStorage, kEnc8, kNarrowNe>(L, src);
  else return false;
  return true;
}

extern template bool dispatch_fast<MemDelta>(const Launch&, int, int, const MemDelta&);
extern template bool dispatch_fast<AdamSrc>(const Launch&, int, int, const AdamSrc&);
#define GS_EXTERN_GENERIC(PATH, SRC) \
  extern template void launch_generic<PATH, SRC>(const Launch&, int, const SRC&);
GS_EXTERN_GENERIC(kStorage, MemDelta)
GS_EXTERN_GENERIC(kMaster, MemDelta)
GS_EXTERN_GENERIC(kKahan, MemDelta)
GS_EXTERN_GENERIC(kStorage, AdamSrc)
GS_EXTERN_GENERIC(kMaster, AdamSrc)
GS_EXTERN_GENERIC(kKahan, AdamSrc)
#undef GS_EXTERN_GENERIC

// The general kernel (mode read at run time), any path and encoding.
template <class Src>
void dispatch_general(const Launch& L, int path, int enc, const Src& src) {
  switch (path) {
    case kMaster: return launch_generic<kMaster>(L, enc, src);
    case kKahan: return launch_generic<kKahan>(L, enc, src);
    default: return launch_generic<kStorage>(L, enc, src);
  }
}

}  // namespace upd
}  // namespace cuda
}  // namespace gatesim
