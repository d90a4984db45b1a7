// CPU range kernel of apply_update; included by kernels_impl.h (once per ISA build).
//
// Work is split into fixed blocks of kUpdateBlock elements, aligned to element 0. Each
// block writes its integer statistics into `counts` (atomic adds of per-block totals:
// integers, so order does not matter) and its absorbed mass into `block_mass[block]`,
// computed in a fixed order (8 interleaved lanes, then lanes 0..7) so the double result
// is the same for every thread count and instruction set; the caller sums blocks in order.
#pragma once
#include <cstdint>
#include <type_traits>


#include "cpu/kernels.h"
#include "cpu/philox_simd.h"
#include "gatesim/update.h"
#if defined(GS_ISA_AVX512)
#include "cpu/replay_avx512.h"
#include "cpu/stats_avx512.h"
#endif

namespace gatesim {
namespace cpu {
namespace {

// Statistics of one run from the before/after values kept by update_run: flag counts
// (integer reductions, so their order is free), histogram bins and absorbed mass.
inline void stats_run(const uint32_t* __restrict__ po, const uint32_t* __restrict__ pn,
                      const double* __restrict__ u, const uint32_t* __restrict__ db,
                      const uint32_t* __restrict__ differs, int64_t cnt, const Spec& spec,
                      uint32_t* __restrict__ counts7, int8_t* __restrict__ bins,
                      double* __restrict__ mass) {
  const int emin = spec.emin, m = spec.m, msub = spec.msub;
  uint32_t c0 = 0, c1 = 0, c2 = 0, c3 = 0, c4 = 0, c5 = 0, c6 = 0;
#pragma omp simd reduction(+ : c0, c1, c2, c3, c4, c5, c6)
  for (int64_t j = 0; j < cnt; ++j) {
    const uint32_t f = element_flags(po[j], pn[j], db[j], u[j], differs[j]);
    c0 += f & 1u;
    c1 += (f >> 1) & 1u;
    c2 += (f >> 2) & 1u;
    c3 += (f >> 3) & 1u;
    c4 += (f >> 4) & 1u;
    c5 += (f >> 5) & 1u;
    c6 += (f >> 6) & 1u;
    bins[j] = static_cast<int8_t>(element_bin(po[j], u[j], emin, m, msub));
    const double au = u[j] < 0.0 ? -u[j] : u[j];
    mass[j] = ((f >> 1) & 1u) ? au : 0.0;
  }
  counts7[0] += c0;
  counts7[1] += c1;
  counts7[2] += c2;
  counts7[3] += c3;
  counts7[4] += c4;
  counts7[5] += c5;
  counts7[6] += c6;
}

// Elements per run of update_run (see update_blocks).
constexpr int64_t kRun = 512;

// Whether the hand-written master kernel (replay_avx512.h) serves this step: bf16 values
// (bf16 storage or fp32 holding them), nearest-even.
template <int MODE, int ENC>
inline bool bf16_master_kernel_applies(const Spec& sp) {
  return (ENC == kEncHi16 || ENC == kEncF32) && MODE == kNearestEven && sp.fast_ne && sp.m == 7;
}

#if defined(GS_ISA_AVX512)
// The master step into bf16 with nearest-even by the hand-written kernel
// (replay_avx512.h). m32 / m64: the run's slots of the block's mass buffer (fp32
// masses, or fp64 ones when SCALED). update_blocks counts the block's histogram
// (PendingBlock).
template <bool SCALED, int ENC>
inline void master_bf16_avx512(void* param, int64_t i0, float* ms, const float* dl, int64_t cnt,
                               const Spec& sp, const ReplayScale* scale, uint32_t* counts7,
                               int8_t* bins, float* m32, double* m64) {
  constexpr bool F32 = ENC == kEncF32;
  void* pp = F32 ? static_cast<void*>(static_cast<uint32_t*>(param) + i0)
                 : static_cast<void*>(static_cast<uint16_t*>(param) + i0);
  replay_bf16_ne_avx512<SCALED, F32>(pp, ms, dl, cnt, sp, scale, counts7, bins, m32, m64);
}
#endif

// A compile-time bool as a value (for generic lambdas instantiated per case).
template <bool B>
struct BoolTag {
  static constexpr bool value = B;
};

// One run of elements [i0, i1) (at most kRun, inside one block) with their random words r0/r1.
// The update loop keeps the stored value before/after and u for the statistics: flag
// counts into counts7, one histogram bin per element into the block's `bins` (counted by
// the caller once the block is done) and masses into the block's `mass`.
template <int MODE, bool UNIFORM, int PATH, int ENC, int STATS, bool SIMPLE = false>
inline void update_run(const UpdatePtrs& t, const UpdateArgs& args, bool stats_rt, int64_t i0,
                       int64_t i1, const uint32_t* r0, const uint32_t* r1, int64_t blk0,
                       uint32_t* counts7, int8_t* bins, double* mass) {
  const UpdateArgs a = args;  // a local copy: stores through the pointers cannot alias it
  const Spec sp = a.sp;
  const float alpha = a.alpha, decay = a.decay;
  const double alpha_d = alpha, decay_m1 = static_cast<double>(decay) - 1.0;
  // Without decay the decay term is 0 even for an infinite x (not 0 * inf = NaN): x's
  // bits are masked by a loop-invariant integer rather than selected (see shr_sat).
  const uint64_t xkeep = decay == 1.0f ? 0ull : ~0ull;
  void* const param = t.param;
  const float* __restrict__ dl = t.delta + i0;
  float* __restrict__ ms = t.master + (t.master ? i0 : 0);
  const int64_t cnt = i1 - i0;
  // STATS: 1 on, 0 off, -1 decided at run time (generic paths).
  const bool stats = STATS < 0 ? stats_rt : STATS > 0;
  alignas(64) uint32_t pob[kRun], pnb[kRun], dfb[kRun];
  alignas(64) double ub[kRun];
  if (PATH == kMaster && SIMPLE && STATS > 0) {
#if defined(GS_ISA_AVX512)
    if (bf16_master_kernel_applies<MODE, ENC>(sp)) {
      master_bf16_avx512<false, ENC>(param, i0, ms, dl, cnt, sp, nullptr,
                                counts7, bins + (i0 - blk0),
                                reinterpret_cast<float*>(mass) + (i0 - blk0), nullptr);
      return;
    }
#endif
    // The replay step: update and 32-bit statistics fused in one vector loop.
    const int mb = sp.m;
    uint32_t c0 = 0, c1 = 0, c2 = 0, c3 = 0, c4 = 0, c5 = 0;
    // Bins go out as 32-bit values and are packed to bytes after the loop: an int8 store
    // in the loop makes the vectorizer take 64 elements per iteration (four vectors of
    // every 32-bit value), and the loop then spills registers to the stack.
    alignas(64) int32_t bn[kRun];
    float* __restrict__ ma = reinterpret_cast<float*>(mass) + (i0 - blk0);
#pragma omp simd reduction(+ : c0, c1, c2, c3, c4, c5)
    for (int64_t j = 0; j < cnt; ++j) {
      const uint32_t po = load_code<ENC>(param, i0 + j, sp);
      const float d = dl[j];
      const uint32_t db = f32_bits(d);
      const float m2 = add32(ms[j], d);
      ms[j] = m2;
      const uint32_t pn = round_m<MODE, UNIFORM, uint32_t>(f32_bits(m2), sp, a.mode, r1[j]);
      store_code<ENC>(param, i0 + j, pn, sp);
      const uint32_t same = (po == pn ? 1u : 0u) | (((po | pn) & 0x7FFFFFFFu) == 0 ? 1u : 0u);
      const uint32_t old_nan = (po & 0x7FFFFFFFu) > 0x7F800000u ? 1u : 0u;
      const uint32_t changed = (same ^ 1u) | old_nan;
      const uint32_t zero = (db & 0x7FFFFFFFu) == 0 ? 1u : 0u;
      const uint32_t absorbed = (zero ^ 1u) & (changed ^ 1u);
      c0 += changed;
      c1 += absorbed;
      c2 += zero;
      c3 += nonfinite32(db);
      c4 += nonfinite32(po);
      c5 += nonfinite32(pn);
      bn[j] = element_bin32_uniform(po, db, mb);  // the fast paths are uniform
      ma[j] = absorbed ? bits_f32(db & 0x7FFFFFFFu) : 0.0f;
    }
    int8_t* __restrict__ b8 = bins + (i0 - blk0);
#pragma omp simd
    for (int64_t j = 0; j < cnt; ++j) b8[j] = static_cast<int8_t>(bn[j]);
    counts7[0] += c0;
    counts7[1] += c1;
    counts7[2] += c2;
    counts7[3] += c3;
    counts7[4] += c4;
    counts7[5] += c5;
    return;
  }
  if (PATH == kStorage && MODE >= 0 && STATS >= 0) {
    // Storage-only fast path (mode known at compile time): both sum modes are computed
    // branch-free, so the loop vectorizes; sum_differs comes for free. FP32NE: the
    // format is fp32 itself with nearest-even (hardware rounding of the exact sum); the
    // dispatcher says so through SIMPLE, which on this path means "the format is FP32".
    constexpr bool FP32NE = SIMPLE && ENC == kEncF32 && MODE == kNearestEven;
    // Otherwise (a format of at most 21 mantissa bits, nearest-even: bf16, fp16, fp8) the
    // exact sum is rounded to odd into fp32 first (24 >= m + 2 bits at every magnitude,
    // since every format lies inside fp32's range), then to the format.
    constexpr bool NARROW_NE = !SIMPLE && MODE == kNearestEven;
    const uint32_t exact = a.sum_mode == kSumExact ? 1u : 0u;
    // UNIT: FP32NE with alpha == 1 (the optimizers' case): the exact p * decay + d is one
    // hardware fma, no fp64 TwoSum; NARROW_NE with alpha == 1 and no decay (the replay
    // step without master weights): p + d by TwoSum in fp32 (sum_odd32_unit). A loop per
    // case: a select on the loop-invariant alpha would compute both.
    const auto storage_loop = [&](auto unit_tag) {
      constexpr bool UNIT = decltype(unit_tag)::value;
#pragma omp simd
      for (int64_t j = 0; j < cnt; ++j) {
        const uint32_t po = load_code<ENC>(param, i0 + j, sp);
        const float p = bits_f32(po);
        const float d = dl[j];
        uint32_t pe, pf;
        if (FP32NE) {
            pe = UNIT ? storage_exact_fp32_ne_unit(p, d, decay)
                    : storage_exact_fp32_ne(p, d, decay, alpha);
          pf = storage_fp32_fp32_ne(p, d, decay, alpha);
        } else if (NARROW_NE) {
          pe = round_m<MODE, UNIFORM, uint32_t>(
              UNIT ? sum_odd32_unit(p, d) : exact_sum_odd32(p, d, decay, alpha), sp, a.mode, 0u);
          pf = storage_step<MODE, UNIFORM>(p, d, a, kSumFp32, 0u, 0u);
        } else {
          pe = storage_step<MODE, UNIFORM>(p, d, a, kSumExact, r0[j], r1[j]);
          pf = storage_step<MODE, UNIFORM>(p, d, a, kSumFp32, r0[j], r1[j]);
        }
        const uint32_t pn = blend(pf, pe, exact);
        store_code<ENC>(param, i0 + j, pn, sp);
        pob[j] = po;
        pnb[j] = pn;
        ub[j] = alpha_d * d + decay_m1 * bits_f64(f64_bits(p) & xkeep);
        dfb[j] = pe != pf ? 1u : 0u;
      }
    };
#if defined(GS_ISA_AVX512)
    if (FP32NE && STATS > 0 && alpha == 1.0f) {  // the optimizers' fp32 policy, fused
      storage_fp32_ne_avx512(static_cast<uint32_t*>(param) + i0, dl, cnt, sp, decay,
                             exact != 0, counts7, bins + (i0 - blk0), mass + (i0 - blk0));
      return;
    }
    // bf16 storage, alpha 1, no decay: fused with its statistics (replay_avx512.h); also
    // without them (update_blocks then drops them): faster than the portable loop
    if (NARROW_NE && ENC == kEncHi16 && STATS >= 0 && sp.fast_ne && sp.m == 7 &&
        alpha == 1.0f && decay == 1.0f) {
      storage_bf16_unit_avx512(static_cast<uint16_t*>(param) + i0, dl, cnt, sp, exact != 0,
                               counts7, bins + (i0 - blk0), mass + (i0 - blk0));
      return;
    }
#endif
    if ((FP32NE && alpha == 1.0f) || (NARROW_NE && alpha == 1.0f && decay == 1.0f))
      storage_loop(BoolTag<true>{});
    else storage_loop(BoolTag<false>{});
  } else if (PATH == kMaster) {
#if defined(GS_ISA_AVX512)
    if (STATS > 0 && bf16_master_kernel_applies<MODE, ENC>(sp)) {
      // The scaled master step (the optimizers' bf16 + fp32 master policy).
      const ReplayScale scale(alpha, decay);
      master_bf16_avx512<true, ENC>(param, i0, ms, dl, cnt, sp, &scale,
                               counts7, bins + (i0 - blk0), nullptr, mass + (i0 - blk0));
      return;
    }
#endif
#pragma omp simd
    for (int64_t j = 0; j < cnt; ++j) {
      const uint32_t po = load_code<ENC>(param, i0 + j, sp);
      const float d = dl[j];
      const float m = ms[j];
      const float m2 = fma32(alpha, d, mul32(m, decay));
      ms[j] = m2;
      const uint32_t pn = round_m<MODE, UNIFORM, uint32_t>(f32_bits(m2), sp, a.mode, r1[j]);
      store_code<ENC>(param, i0 + j, pn, sp);
      pob[j] = po;
      pnb[j] = pn;
      ub[j] = alpha_d * d + decay_m1 * bits_f64(f64_bits(m) & xkeep);
      dfb[j] = 0;
    }
  } else if (PATH == kKahan && MODE >= 0) {
    // Kahan with the mode known at compile time (nearest-even, stochastic), one loop per
    // sum mode (a select on the loop-invariant mode would compute both): K -1 the exact
    // sums by kahan_step, -2 sum mode "fp32"; K >= 0 the exact sums by 32-bit roundings
    // (nearest-even, formats of at most 21 bits), K being kahan_step_exact_ne_narrow's
    // SIMPLER (1 without decay, 2 also with alpha 1).
    const auto kahan_loop = [&](auto k_tag) {
      constexpr int K = decltype(k_tag)::value;
#pragma omp simd
      for (int64_t j = 0; j < cnt; ++j) {
        const uint32_t po = load_code<ENC>(param, i0 + j, sp);
        const float p = bits_f32(po);
        const float d = dl[j];
        const float c = bits_f32(load_code<ENC>(t.comp, i0 + j, a.spc));
        uint32_t pn, cn;
        if (K >= 0) kahan_step_exact_ne_narrow<UNIFORM, (K >= 0 ? K : 0)>(p, c, d, a, pn, cn);
        else if (K == -2) kahan_step_fp32sum<MODE, UNIFORM>(p, c, d, a, r0[j], r1[j], pn, cn);
        else kahan_step<MODE, UNIFORM>(p, c, d, a, r0[j], r1[j], pn, cn);
        store_code<ENC>(t.comp, i0 + j, cn, a.spc);
        store_code<ENC>(param, i0 + j, pn, sp);
        pob[j] = po;
        pnb[j] = pn;
        ub[j] = alpha_d * d + decay_m1 * bits_f64(f64_bits(p) & xkeep);
        dfb[j] = 0;
      }
    };
    if (a.sum_mode != kSumExact) kahan_loop(std::integral_constant<int, -2>{});
    else if (MODE != kNearestEven || sp.m > 21 || a.spc.m > 21)
      kahan_loop(std::integral_constant<int, -1>{});
    else if (decay != 1.0f) kahan_loop(std::integral_constant<int, 0>{});
    else if (alpha != 1.0f) kahan_loop(std::integral_constant<int, 1>{});
    else kahan_loop(std::integral_constant<int, 2>{});
  } else {
    for (int64_t j = 0; j < cnt; ++j) {
      const uint32_t po = load_code<ENC>(param, i0 + j, sp);
      const float p = bits_f32(po);
      const float d = dl[j];
      uint32_t pn;
      uint32_t differs = 0;
      if (PATH == kKahan) {
        const float c = bits_f32(load_code<ENC>(t.comp, i0 + j, a.spc));
        uint32_t cn;
        kahan_step<MODE, UNIFORM>(p, c, d, a, r0[j], r1[j], pn, cn);
        store_code<ENC>(t.comp, i0 + j, cn, a.spc);
      } else {
        pn = storage_step<MODE, UNIFORM>(p, d, a, a.sum_mode, r0[j], r1[j]);
        if (stats) {
          differs = storage_step<MODE, UNIFORM>(p, d, a, 1 - a.sum_mode, r0[j], r1[j]) != pn;
        }
      }
      store_code<ENC>(param, i0 + j, pn, sp);
      pob[j] = po;
      pnb[j] = pn;
      ub[j] = alpha_d * d + decay_m1 * bits_f64(f64_bits(p) & xkeep);
      dfb[j] = differs;
    }
  }
  if (stats) {
    const int64_t k = i0 - blk0;
#if defined(GS_ISA_AVX512)
    stats_run_avx512(pob, pnb, ub, reinterpret_cast<const uint32_t*>(dl), dfb, cnt, sp, counts7,
                     bins + k, mass + k);
#else
    stats_run(pob, pnb, ub, reinterpret_cast<const uint32_t*>(dl), dfb, cnt, sp, counts7,
              bins + k, mass + k);
#endif
  }
}

// Three levels of tree_sum at once: with half = 4h, 2h, h, element k < h of the result is
// ((a[k] + a[k+4h]) + (a[k+2h] + a[k+6h])) + ((a[k+h] + a[k+5h]) + (a[k+3h] + a[k+7h])),
// the same additions in the same order as the three level loops, with one pass over
// memory instead of three (the levels were about an eighth of the replay step's time).
template <typename T>
inline void tree_levels3(const T* __restrict__ a, double* __restrict__ out, int64_t h,
                         int64_t k0, int64_t k1) {
#pragma omp simd
  for (int64_t k = k0; k < k1; ++k) {
    const double b0 = static_cast<double>(a[k]) + static_cast<double>(a[k + 4 * h]);
    const double b2 = static_cast<double>(a[k + 2 * h]) + static_cast<double>(a[k + 6 * h]);
    const double b1 = static_cast<double>(a[k + h]) + static_cast<double>(a[k + 5 * h]);
    const double b3 = static_cast<double>(a[k + 3 * h]) + static_cast<double>(a[k + 7 * h]);
    out[k] = (b0 + b2) + (b1 + b3);
  }
}

// Elements per piece of a finished block's statistics (PendingBlock): a run's worth.
constexpr int64_t kPiece = kUpdateBlock / 8;
static_assert(kUpdateBlock == 8 * 8 * 8 * 8 && kPiece == kRun, "eight runs, eight pieces");

// A block's histogram in eight pieces of kPiece bytes. AVX-512 with VBMI/GFNI/VPOPCNTDQ:
// bit-sliced (hist_bitsliced512) into lane counters, added up once at the end (flush);
// otherwise, and for a tensor's last, partial block, histogram_bytes on the whole block
// at its first piece.
struct BlockHist {
#if defined(GS_ISA_AVX512)
  alignas(64) int64_t lanes[kHistBins * 8] = {};
  const bool sliced = hist_bitsliced_supported();
#else
  static constexpr bool sliced = false;
#endif
  void piece(const int8_t* p, int64_t len, int r, int64_t* hist) {
#if defined(GS_ISA_AVX512)
    if (sliced && len == kUpdateBlock) {
      hist_bitsliced512(p + r * kPiece, reinterpret_cast<__m512i*>(lanes));
      return;
    }
#endif
    if (r == 0) histogram_bytes(p, len, kHistBins, hist);
  }
  void flush(int64_t* hist) const {
#if defined(GS_ISA_AVX512)
    for (int b = 0; b < kHistBins; ++b) {
      for (int l = 0; l < 8; ++l) hist[b] += lanes[b * 8 + l];
    }
#endif
    (void)hist;
  }
};

// The statistics of a finished block, its histogram and its absorbed mass (tree_sum over
// its kUpdateBlock masses, zero-padded), done in eight pieces between the runs of the next
// block. This work touches no memory beyond the block's scratch; done all at once it
// paused the memory streams (one thread, replay step: about 3.5 of 14.5 ms); spread out
// it overlaps them. The tree's levels go three at a time (tree_levels3: levels
// 2048..512 in pieces, then 256..64, 32..8 and the last eight values).
template <typename T>
struct PendingBlock {
  const int8_t* bins = nullptr;
  const T* mass = nullptr;
  int64_t b = -1, len = 0;
  bool tree = false;
  int done = 0;
  alignas(64) double t1[kPiece];

  void start(const int8_t* bins_, const T* mass_, int64_t b_, int64_t len_, bool tree_) {
    bins = bins_;
    mass = mass_;
    b = b_;
    len = len_;
    tree = tree_;
    done = 0;
  }
  void piece(BlockHist& h, int64_t* hist) {
    if (b < 0 || done == 8) return;
    const int r = done++;
    h.piece(bins, len, r, hist);
    if (tree) tree_levels3(mass, t1, kPiece, r * (kPiece / 8), (r + 1) * (kPiece / 8));
  }
  // The pieces left, then the block's mass into block_mass[b].
  void finish(BlockHist& h, int64_t* hist, double* block_mass) {
    if (b < 0) return;
    while (done < 8) piece(h, hist);
    if (tree) {
      alignas(64) double t2[kPiece / 8];
      alignas(64) double t3[8];
      tree_levels3(t1, t2, kPiece / 8, 0, kPiece / 8);
      tree_levels3(t2, t3, 8, 0, 8);
      block_mass[b] = tree_sum(t3, 8);
    } else {
      block_mass[b] = 0.0;  // nothing absorbed: every mass is +0, and so is the sum
    }
    b = -1;
  }
};

template <int MODE, bool UNIFORM, int PATH, int ENC, int STATS, bool SIMPLE = false>
void update_blocks(const UpdatePtrs& t, const UpdateArgs& a, bool stats, int64_t b_begin,
                   int64_t b_end, int64_t n, int64_t* counts, double* block_mass) {
  // Per-block scratch, two of each (this block's, and the previous block's while its
  // statistics are finished): bins, masses and random words of the whole block (the mass
  // tree and the stream blocks span it); update_run works through it in runs of kRun.
  // The fused replay loops store float masses (exact: |delta|) in the same buffer.
  using MassT = std::conditional_t<SIMPLE && PATH == kMaster, float, double>;
  alignas(64) int8_t bins[2][kUpdateBlock];
  alignas(64) double mass[2][kUpdateBlock];
  alignas(64) uint32_t r0[kUpdateBlock + 64];
  alignas(64) uint32_t r1[kUpdateBlock + 64];
  const bool sr = a.mode == kStochastic;
  const bool two_draws = sr && PATH != kMaster;
  int64_t local[kNumStats] = {0};
  int64_t* hist = local + kStatHist0;
  BlockHist hist_acc;
  PendingBlock<MassT> pend;
  int cur = 0;
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t blk0 = b * kUpdateBlock;
    const int64_t blk1 = (blk0 + kUpdateBlock) < n ? (blk0 + kUpdateBlock) : n;
    const int64_t len = blk1 - blk0;
    // Random words of positions offset + blk0 .. offset + blk1 - 1, from whole
    // 64-word stream blocks (the first may start before the block: skip).
    const uint64_t p0 = a.offset + static_cast<uint64_t>(blk0);
    const int64_t skip = static_cast<int64_t>(p0 & 63u);
    if (sr) {
      for (int64_t w = 0; w < skip + len; w += 64) {
        random_block64_simd(a.seed, (p0 >> 6) + static_cast<uint64_t>(w >> 6), r1 + w, 2 * a.step + 1);
        if (two_draws) random_block64_simd(a.seed, (p0 >> 6) + static_cast<uint64_t>(w >> 6), r0 + w, 2 * a.step);
      }
    }
    uint32_t counts7[7] = {0, 0, 0, 0, 0, 0, 0};
    // Runs of kRun elements: a run's scratch (values before/after, u: 20 bytes per
    // element) stays in L1, and the memory streams pause only briefly between runs;
    // after each run, a piece of the previous block's statistics.
    for (int64_t s0 = blk0; s0 < blk1; s0 += kRun) {
      const int64_t s1 = (s0 + kRun) < blk1 ? (s0 + kRun) : blk1;
      update_run<MODE, UNIFORM, PATH, ENC, STATS, SIMPLE>(
          t, a, stats, s0, s1, r0 + skip + (s0 - blk0), r1 + skip + (s0 - blk0), blk0, counts7,
          bins[cur], mass[cur]);
      if (stats) pend.piece(hist_acc, hist);
    }
    if (!stats) continue;
    pend.finish(hist_acc, hist, block_mass);  // its pieces left (this block had < 8 runs)
    local[kStatN] += len;
    for (int f = 0; f < 7; ++f) local[kStatChanged + f] += counts7[f];
    MassT* m = reinterpret_cast<MassT*>(mass[cur]);
    const bool absorbed = counts7[1] != 0;
    if (absorbed) {
      for (int64_t k = len; k < kUpdateBlock; ++k) m[k] = MassT(0);
    }
    pend.start(bins[cur], m, b, len, absorbed);
    cur ^= 1;
  }
  if (stats) {
    pend.finish(hist_acc, hist, block_mass);
    hist_acc.flush(hist);
    for (int s = 0; s < kNumStats; ++s) {
      if (local[s]) __atomic_fetch_add(&counts[s], local[s], __ATOMIC_RELAXED);
    }
  }
}

template <int MODE, int ENC>
void master_fast_s(const UpdatePtrs& t, const UpdateArgs& a, bool stats, int64_t b0, int64_t b1,
                   int64_t n, int64_t* counts, double* bm) {
  if (stats && a.alpha == 1.0f && a.decay == 1.0f)  // u = delta exactly: 32-bit statistics
    return update_blocks<MODE, true, kMaster, ENC, 1, true>(t, a, true, b0, b1, n, counts, bm);
  if (stats) return update_blocks<MODE, true, kMaster, ENC, 1>(t, a, true, b0, b1, n, counts, bm);
  update_blocks<MODE, true, kMaster, ENC, 0>(t, a, false, b0, b1, n, counts, bm);
}

void master_fast(const UpdatePtrs& t, const UpdateArgs& a, int enc, bool stats, int64_t b0,
                 int64_t b1, int64_t n, int64_t* counts, double* bm) {
  if (enc == kEncHi16) {
    if (a.mode == kNearestEven)
      return master_fast_s<kNearestEven, kEncHi16>(t, a, stats, b0, b1, n, counts, bm);
    return master_fast_s<kStochastic, kEncHi16>(t, a, stats, b0, b1, n, counts, bm);
  }
  if (a.mode == kNearestEven)
    return master_fast_s<kNearestEven, kEncF32>(t, a, stats, b0, b1, n, counts, bm);
  master_fast_s<kStochastic, kEncF32>(t, a, stats, b0, b1, n, counts, bm);
}

template <int PATH, int ENC>
void update_generic(const UpdatePtrs& t, const UpdateArgs& a, bool stats, int64_t b0, int64_t b1,
                    int64_t n, int64_t* counts, double* bm) {
  update_blocks<-1, false, PATH, ENC, -1>(t, a, stats, b0, b1, n, counts, bm);
}

template <int MODE>
void kahan_fast_m(const UpdatePtrs& t, const UpdateArgs& a, int enc, bool stats, int64_t b0,
                  int64_t b1, int64_t n, int64_t* counts, double* bm) {
  if (enc == kEncHi16)  // bf16: always uniform (apply_update_range checks)
    return update_blocks<MODE, true, kKahan, kEncHi16, -1>(t, a, stats, b0, b1, n, counts, bm);
  if (enc == kEncF32 && a.sp.uniform)
    return update_blocks<MODE, true, kKahan, kEncF32, -1>(t, a, stats, b0, b1, n, counts, bm);
  if (enc == kEnc16)
    return update_blocks<MODE, false, kKahan, kEnc16, -1>(t, a, stats, b0, b1, n, counts, bm);
  update_blocks<MODE, false, kKahan, kEncF32, -1>(t, a, stats, b0, b1, n, counts, bm);
}

void kahan_fast(const UpdatePtrs& t, const UpdateArgs& a, int enc, bool stats, int64_t b0,
                int64_t b1, int64_t n, int64_t* counts, double* bm) {
  if (a.mode == kNearestEven) return kahan_fast_m<kNearestEven>(t, a, enc, stats, b0, b1, n, counts, bm);
  kahan_fast_m<kStochastic>(t, a, enc, stats, b0, b1, n, counts, bm);
}

void apply_update_range(const UpdatePtrs& t, const UpdateArgs& a, int path, int enc, bool stats,
                        int64_t b0, int64_t b1, int64_t n, int64_t* counts, double* bm) {
  // Fast paths: the replay step "fp32 master -> bf16/fp32 param" in the common modes.
  if (path == kMaster && a.sp.uniform && (enc == kEncHi16 || enc == kEncF32) &&
      (a.mode == kNearestEven || a.mode == kStochastic)) {
    return master_fast(t, a, enc, stats, b0, b1, n, counts, bm);
  }
  // Storage-only in a uniform format (fp32, bf16), nearest-even: the optimizers' fp32 and
  // bf16 policies without master weights.
  const bool fp32 = a.sp.uniform && a.sp.m == 23 && a.sp.has_inf && !a.sp.nan_all_ones &&
                    !a.sp.saturate;
  if (path == kStorage && a.sp.uniform && a.mode == kNearestEven && (a.sp.m <= 21 || fp32)) {
    if (enc == kEncF32 && fp32) {
      if (stats) return update_blocks<kNearestEven, true, kStorage, kEncF32, 1, true>(t, a, true, b0, b1, n, counts, bm);
      return update_blocks<kNearestEven, true, kStorage, kEncF32, 0, true>(t, a, false, b0, b1, n, counts, bm);
    }
    if (enc == kEncF32) {
      if (stats) return update_blocks<kNearestEven, true, kStorage, kEncF32, 1>(t, a, true, b0, b1, n, counts, bm);
      return update_blocks<kNearestEven, true, kStorage, kEncF32, 0>(t, a, false, b0, b1, n, counts, bm);
    }
    if (enc == kEncHi16) {
      if (stats) return update_blocks<kNearestEven, true, kStorage, kEncHi16, 1>(t, a, true, b0, b1, n, counts, bm);
      return update_blocks<kNearestEven, true, kStorage, kEncHi16, 0>(t, a, false, b0, b1, n, counts, bm);
    }
  }
  // Storage-only, nearest-even, other formats (fp16, fp8, custom) of at most 21 bits.
  if (path == kStorage && !a.sp.uniform && a.mode == kNearestEven && a.sp.m <= 21) {
    switch (enc) {
      case kEncF32:
        if (stats) return update_blocks<kNearestEven, false, kStorage, kEncF32, 1>(t, a, true, b0, b1, n, counts, bm);
        return update_blocks<kNearestEven, false, kStorage, kEncF32, 0>(t, a, false, b0, b1, n, counts, bm);
      case kEnc16:
        if (stats) return update_blocks<kNearestEven, false, kStorage, kEnc16, 1>(t, a, true, b0, b1, n, counts, bm);
        return update_blocks<kNearestEven, false, kStorage, kEnc16, 0>(t, a, false, b0, b1, n, counts, bm);
      case kEnc8:
        if (stats) return update_blocks<kNearestEven, false, kStorage, kEnc8, 1>(t, a, true, b0, b1, n, counts, bm);
        return update_blocks<kNearestEven, false, kStorage, kEnc8, 0>(t, a, false, b0, b1, n, counts, bm);
      default:
        break;
    }
  }
  // Kahan in the optimizers' modes (nearest-even, stochastic) and the storage formats
  // they use (bf16, fp16, fp32): mode and format class fixed at compile time.
  if (path == kKahan && (a.mode == kNearestEven || a.mode == kStochastic) &&
      ((enc == kEncHi16 && a.sp.uniform) || enc == kEnc16 || enc == kEncF32)) {
    return kahan_fast(t, a, enc, stats, b0, b1, n, counts, bm);
  }
#define GS_UPDATE_ENC(P)                                                         \
  switch (enc) {                                                                 \
    case kEncF32: return update_generic<P, kEncF32>(t, a, stats, b0, b1, n, counts, bm);   \
    case kEncHi16: return update_generic<P, kEncHi16>(t, a, stats, b0, b1, n, counts, bm); \
    case kEnc16: return update_generic<P, kEnc16>(t, a, stats, b0, b1, n, counts, bm);     \
    default: return update_generic<P, kEnc8>(t, a, stats, b0, b1, n, counts, bm);          \
  }
  switch (path) {
    case kMaster: GS_UPDATE_ENC(kMaster)
    case kKahan: GS_UPDATE_ENC(kKahan)
    default: GS_UPDATE_ENC(kStorage)
  }
#undef GS_UPDATE_ENC
}

}  // namespace
}  // namespace cpu
}  // namespace gatesim
