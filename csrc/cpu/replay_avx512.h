// The replay step with statistics in explicit AVX-512: fp32 master + fp32 delta -> bf16
// parameter, nearest-even, alpha = 1, no decay (apply_update's most used case).
//
// Why by hand: the statistics (six flag counts, the histogram bin, the absorbed mass)
// are more vector work than the update itself, and GCC's vectorization of the portable
// loop (update_impl.h) counts each flag with a vector reduction, works on 32 elements
// per iteration and spills registers; the replay step then ran at 2.8x the time of a
// copy of its bytes. Here flags stay in mask registers and are counted by masked adds
// into vector lanes, the bin arithmetic runs in 16-bit lanes, and the rare cases (non-finite
// values, subnormal updates, a NaN stored before) are detected with one mask test per
// 16 elements and recomputed by the portable per-element functions of gatesim/update.h,
// so the fast path has nothing to do for them.
//
// The outputs are those of the portable loop, bit for bit: the new master and stored
// values, counts7 (changed, absorbed, zero, non-finite delta / before / after), one
// histogram bin per element (-1 for none) and the absorbed |delta| per element as
// float. Tests compare every instruction set's kernels (GATESIM_CPU_ISA) on inputs
// with every special case and ragged lengths.
#pragma once
#include <cstdint>

#include <immintrin.h>

#include "cpu/stats_avx512.h"
#include "gatesim/update.h"

namespace gatesim {
namespace cpu {
namespace {


// The scaled step (EmulatedAdam's and SGD's: m <- fl32(alpha * delta + fl32(m * decay)))
// needs the fp64 update u = alpha * delta + (decay - 1) * m for its statistics, exactly as
// the portable loop forms it (both products are exact in fp64, one rounding in the sum;
// without decay the m term is 0, even for an infinite m).
struct ReplayScale {
  __m512 alpha, decay;
  __m512d alpha_d, decay_m1;
  bool has_decay;
  ReplayScale(float a, float d)
      : alpha(_mm512_set1_ps(a)), decay(_mm512_set1_ps(d)), alpha_d(_mm512_set1_pd(a)),
        decay_m1(_mm512_set1_pd(static_cast<double>(d) - 1.0)), has_decay(d != 1.0f) {}
  __m512d u(__m256 d8, __m256 m8) const {
    const __m512d du = _mm512_mul_pd(alpha_d, _mm512_cvtps_pd(d8));
    if (!has_decay) return du;
    return _mm512_add_pd(du, _mm512_mul_pd(decay_m1, _mm512_cvtps_pd(m8)));
  }
};

// replay16 (below) takes 16 elements at j (lanes of km); its counts go to a LaneCounts.
// SCALED: the scaled step (mass64 gets fp64 masses); otherwise alpha = 1 and no decay
// (u = delta, mass32 gets fp32 masses).
struct ReplayConsts {
  __m512i abs32 = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i inf32 = _mm512_set1_epi32(0x7F800000);
  __m512i max32 = _mm512_set1_epi32(0x7F7FFFFF);
  __m512i qnan = _mm512_set1_epi32(0x7FC00000);
  __m512i rne_bias = _mm512_set1_epi32(0x7FFF);
  __m512i one32 = _mm512_set1_epi32(1);
  __m512i abs_hi16 = _mm512_set1_epi32(0x7FFF);
  __m512i inf_hi16 = _mm512_set1_epi32(0x7F80);
  __m512i ff32 = _mm512_set1_epi32(0xFF);
  __m512i e7ff = _mm512_set1_epi32(0x7FF);
  __m512i zero32 = _mm512_setzero_si512();
  __m512i top32 = _mm512_set1_epi32(kHistBins - 1);
  __m512i none32 = _mm512_set1_epi32(-1);
  __m512i lo16 = _mm512_set1_epi32(0xFFFF);
  __m256i abs16 = _mm256_set1_epi16(0x7FFF);
  __m256i exp16 = _mm256_set1_epi16(0x7F80);
  __m256i ff16 = _mm256_set1_epi16(0xFF);
  __m256i one16 = _mm256_set1_epi16(1);
  __m256i zero16 = _mm256_setzero_si256();
  __m256i top16 = _mm256_set1_epi16(kHistBins - 1);
  __m256i none16 = _mm256_set1_epi16(-1);
  __m256i bin_off;  // m - kHistLo + 1: bin = E(u) - max(E(p), 1) + that (element_bin32_uniform)
  // the same for an fp64 u (element_bin with ulp(p) = 2^(max(E(p), 1) - 127 - m)):
  // bin = E64(u) - max(E(p), 1) + bin_off64
  __m512i bin_off64;
  int m, emin, msub;
  explicit ReplayConsts(const Spec& sp)
      : bin_off(_mm256_set1_epi16(static_cast<int16_t>(sp.m - kHistLo + 1))),
        bin_off64(_mm512_set1_epi32(127 + sp.m - 1023 - kHistLo + 1)), m(sp.m), emin(sp.emin),
        msub(sp.msub) {}
};

// A run's flag counts: changed, absorbed, zero and sum_differs in vector lanes; the
// non-finite counts (delta, before, after), which only rare lanes add to, as scalars.
struct LaneCounts {
  __m512i changed, absorbed, zero, differs;
  uint64_t nf[3] = {0, 0, 0};
  // user-provided: GCC does not give an implicit constructor the file's target pragma
  LaneCounts()
      : changed(_mm512_setzero_si512()), absorbed(changed), zero(changed), differs(changed) {}
  // A rare lane's flags (element_flags): its changed bit, and the non-finite counts.
  void rare_lane(uint32_t f, int l, __mmask16& changed) {
    changed = static_cast<__mmask16>((changed & ~(1u << l)) | ((f & 1u) << l));
    nf[0] += (f >> 3) & 1u;
    nf[1] += (f >> 4) & 1u;
    nf[2] += (f >> 5) & 1u;
  }
  // The 16 lanes' changed, absorbed (non-zero update, unchanged bits), zero and differs
  // flags; returns absorbed.
  __mmask16 add(__mmask16 km, __mmask16 ch, __mmask16 zr, __mmask16 df, __m512i one) {
    const __mmask16 ab = static_cast<__mmask16>(~zr & ~ch & km);
    changed = _mm512_mask_add_epi32(changed, ch, changed, one);
    absorbed = _mm512_mask_add_epi32(absorbed, ab, absorbed, one);
    zero = _mm512_mask_add_epi32(zero, zr, zero, one);
    differs = _mm512_mask_add_epi32(differs, df, differs, one);
    return ab;
  }
  // lane counts stay far below 2^31 (a run is at most one block)
  void flush(uint32_t* counts7) const {
    counts7[0] += static_cast<uint32_t>(_mm512_reduce_add_epi32(changed));
    counts7[1] += static_cast<uint32_t>(_mm512_reduce_add_epi32(absorbed));
    counts7[2] += static_cast<uint32_t>(_mm512_reduce_add_epi32(zero));
    counts7[3] += static_cast<uint32_t>(nf[0]);
    counts7[4] += static_cast<uint32_t>(nf[1]);
    counts7[5] += static_cast<uint32_t>(nf[2]);
    counts7[6] += static_cast<uint32_t>(_mm512_reduce_add_epi32(differs));
  }
};

// m2 with its NaN made canonical (add32 / mul32 / fma32)
inline __m512 canon_ps(__m512 x, const ReplayConsts& c) {
  return _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_castsi512_ps(c.qnan));
}

// Histogram bins of 16 updates u = delta (fp32 bits db) on bf16 codes po, in 16-bit
// lanes (element_bin32_uniform; -1 where zero; rare lanes are redone by the caller).
inline __m128i bins_delta16(__m512i db, __m256i po, __mmask16 zero, const ReplayConsts& c) {
  const __m256i eu = _mm256_and_si256(_mm512_cvtepi32_epi16(_mm512_srli_epi32(db, 23)), c.ff16);
  const __m256i ep = _mm256_and_si256(_mm256_srli_epi16(po, 7), c.ff16);
  __m256i k = _mm256_add_epi16(_mm256_sub_epi16(eu, _mm256_max_epi16(ep, c.one16)), c.bin_off);
  k = _mm256_min_epi16(_mm256_max_epi16(k, c.zero16), c.top16);
  k = _mm256_mask_mov_epi16(k, zero, c.none16);
  return _mm256_cvtepi16_epi8(k);
}

// The rare lanes of 16 elements, redone by the portable per-element functions: their
// flags (changed bit, non-finite counts) and histogram bins, into k8. The stored values
// before are bf16 codes po, or (F32) fp32 bits po32; after, bf16 codes pn; the update is
// delta (bits db), or (SCALED) the fp64 u_lo / u_hi.
template <bool SCALED, bool F32>
inline __m128i rare_lanes16(__mmask16 rare, __m256i po, __m512i po32, __m256i pn, __m512i db,
                            __m512d u_lo, __m512d u_hi, __m128i k8, const ReplayConsts& c,
                            LaneCounts& cc, __mmask16& changed) {
  alignas(32) uint16_t pob[16], pnb[16];
  alignas(64) uint32_t dbb[16], o32[16];
  alignas(64) double ub[16];
  alignas(16) int8_t kb[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(pob), po);
  _mm256_store_si256(reinterpret_cast<__m256i*>(pnb), pn);
  _mm512_store_si512(dbb, db);
  if (F32) _mm512_store_si512(o32, po32);
  if (SCALED) {
    _mm512_store_pd(ub, u_lo);
    _mm512_store_pd(ub + 8, u_hi);
  }
  _mm_store_si128(reinterpret_cast<__m128i*>(kb), k8);
  for (int l = 0; l < 16; ++l) {
    if (!((rare >> l) & 1u)) continue;
    const uint32_t o = F32 ? o32[l] : static_cast<uint32_t>(pob[l]) << 16;
    const uint32_t n = static_cast<uint32_t>(pnb[l]) << 16;
    const double ul = SCALED ? ub[l] : static_cast<double>(bits_f32(dbb[l]));
    const uint32_t f = element_flags(o, n, dbb[l], ul, 0u);
    cc.rare_lane(f, l, changed);
    kb[l] = static_cast<int8_t>(SCALED ? element_bin(o, ul, c.emin, c.m, c.msub)
                                       : element_bin32_uniform(o, dbb[l], c.m));
  }
  return _mm_load_si128(reinterpret_cast<const __m128i*>(kb));
}

template <bool TAIL, bool SCALED, bool F32>
inline __attribute__((always_inline)) void replay16(
    void* __restrict__ pp, float* __restrict__ ms, const float* __restrict__ dl, int64_t j,
    __mmask16 km, const ReplayConsts& c, const ReplayScale* sc, LaneCounts& cc,
    int8_t* __restrict__ bins, float* __restrict__ mass32, double* __restrict__ mass64) {
  uint16_t* __restrict__ p16 = static_cast<uint16_t*>(pp);
  uint32_t* __restrict__ p32 = static_cast<uint32_t*>(pp);
  if (!TAIL) {
    _mm_prefetch(reinterpret_cast<const char*>(ms + j + kPrefetch), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(dl + j + kPrefetch), _MM_HINT_T1);
    if (F32) _mm_prefetch(reinterpret_cast<const char*>(p32 + j + kPrefetch), _MM_HINT_T1);
    else if ((j & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(p16 + j + kPrefetch), _MM_HINT_T1);
  }
  const __m512 mv = TAIL ? _mm512_maskz_loadu_ps(km, ms + j) : _mm512_loadu_ps(ms + j);
  const __m512 dv = TAIL ? _mm512_maskz_loadu_ps(km, dl + j) : _mm512_loadu_ps(dl + j);
  // The stored values as bf16 codes. F32: a bf16 value held in an fp32 tensor; one with
  // non-zero low bits (not a value of the format) takes the rare path.
  __m512i po32 = _mm512_setzero_si512();
  __m256i po;
  if (F32) {
    po32 = TAIL ? _mm512_maskz_loadu_epi32(km, p32 + j) : _mm512_loadu_si512(p32 + j);
    po = _mm512_cvtepi32_epi16(_mm512_srli_epi32(po32, 16));
  } else {
    po = TAIL ? _mm256_maskz_loadu_epi16(km, p16 + j)
              : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p16 + j));
  }
  // the new master in fp32, NaN made canonical: m + delta, or fma(alpha, delta, m * decay)
  const __m512 m2 = SCALED ? canon_ps(_mm512_fmadd_ps(sc->alpha, dv, canon_ps(_mm512_mul_ps(mv, sc->decay), c)), c)
                           : canon_ps(_mm512_add_ps(mv, dv), c);
  if (TAIL) _mm512_mask_storeu_ps(ms + j, km, m2);
  else _mm512_storeu_ps(ms + j, m2);
  // nearest-even to bf16 (round_ne_uniform with d = 16: m2's NaN is already +qNaN, and
  // no carry reaches the sign: the largest sum, NaN's, stays below 2^31)
  const __m512i u = _mm512_castps_si512(m2);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), c.one32);
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, c.rne_bias), lsb), 16);
  const __m256i pn = _mm512_cvtepi32_epi16(r);
  if (F32) {
    const __m512i pn32 = _mm512_slli_epi32(r, 16);
    if (TAIL) _mm512_mask_storeu_epi32(p32 + j, km, pn32);
    else _mm512_storeu_si512(p32 + j, pn32);
  } else if (TAIL) {
    _mm256_mask_storeu_epi16(p16 + j, km, pn);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p16 + j), pn);
  }

  // changed: stored bits differ, +0 == -0 (a NaN stored before: rare path below)
  const __mmask16 same = _mm256_cmpeq_epi16_mask(po, pn) |
                         _mm256_testn_epi16_mask(_mm256_or_si256(po, pn), c.abs16);
  __mmask16 changed = static_cast<__mmask16>(~same & km);
  const __m512i db = _mm512_castps_si512(dv);
  // the update's zero test and histogram bin: from delta's bits (u = delta), or from u
  __mmask16 zero;
  __m128i k8;
  __m512d u_lo = _mm512_setzero_pd(), u_hi = u_lo;  // SCALED only
  if (SCALED) {
    u_lo = sc->u(_mm512_castps512_ps256(dv), _mm512_castps512_ps256(mv));
    u_hi = sc->u(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(dv), 1)),
                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(mv), 1)));
    const __m512d z = _mm512_setzero_pd();
    zero = static_cast<__mmask16>(
        (_mm512_cmp_pd_mask(u_lo, z, _CMP_EQ_OQ) |
         (static_cast<unsigned>(_mm512_cmp_pd_mask(u_hi, z, _CMP_EQ_OQ)) << 8)) & km);
    const __m512i ue = f64_exponents(u_lo, u_hi);
    const __m512i ep = _mm512_and_si512(_mm512_srli_epi32(_mm512_cvtepu16_epi32(po), 7), c.ff32);
    __m512i k = _mm512_add_epi32(_mm512_sub_epi32(ue, _mm512_max_epi32(ep, c.one32)), c.bin_off64);
    k = _mm512_min_epi32(_mm512_max_epi32(k, c.zero32), c.top32);
    k = _mm512_mask_mov_epi32(k, zero | _mm512_cmpeq_epi32_mask(ue, c.e7ff), c.none32);
    k8 = _mm512_cvtepi32_epi8(k);
  } else {
    zero = _mm512_mask_testn_epi32_mask(km, db, c.abs32);
    k8 = bins_delta16(db, po, zero, c);
  }
  // Rare: a subnormal or non-finite delta (one fpclass: NaN, inf, denormal), a
  // non-finite value stored before (exponent field all ones) or after (r >= inf).
  __mmask16 rare = _mm512_fpclass_ps_mask(dv, 0xB9) |
                   _mm256_cmpeq_epi16_mask(_mm256_and_si256(po, c.exp16), c.exp16) |
                   _mm512_cmpge_epu32_mask(_mm512_and_si512(r, c.abs_hi16), c.inf_hi16);
  if (F32) rare |= _mm512_test_epi32_mask(po32, c.lo16);
  rare &= km;
  if (__builtin_expect(rare != 0, 0)) {
    k8 = rare_lanes16<SCALED, F32>(rare, po, po32, pn, db, u_lo, u_hi, k8, c, cc, changed);
  }
  const __mmask16 absorbed = cc.add(km, changed, zero, 0, c.one32);
  if (TAIL) _mm_mask_storeu_epi8(bins + j, km, k8);
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(bins + j), k8);
  if (SCALED) {
    const __m512d a_lo = absorbed_abs(u_lo, static_cast<__mmask8>(absorbed));
    const __m512d a_hi = absorbed_abs(u_hi, static_cast<__mmask8>(absorbed >> 8));
    _mm512_mask_storeu_pd(mass64 + j, static_cast<__mmask8>(km), a_lo);
    _mm512_mask_storeu_pd(mass64 + j + 8, static_cast<__mmask8>(km >> 8), a_hi);
  } else {
    const __m512i am = _mm512_maskz_and_epi32(absorbed, db, c.abs32);
    if (TAIL) _mm512_mask_storeu_epi32(mass32 + j, km, am);
    else _mm512_storeu_si512(mass32 + j, am);
  }
}

// Elements [0, cnt) of one run; pp is the parameter, bf16 codes or (F32) bf16 values in
// fp32 (read, then written), ms the master (read, then written), dl the delta; sp the
// format (bf16). sc: the scaled step (fp64 masses into mass64), or null for alpha = 1
// without decay (fp32 masses into mass32).
template <bool SCALED, bool F32>
inline void replay_bf16_ne_avx512(void* __restrict__ pp, float* __restrict__ ms,
                                  const float* __restrict__ dl, int64_t cnt, const Spec& sp,
                                  const ReplayScale* sc, uint32_t* __restrict__ counts7,
                                  int8_t* __restrict__ bins, float* __restrict__ mass32,
                                  double* __restrict__ mass64) {
  const ReplayConsts c(sp);
  LaneCounts cc;
  int64_t j = 0;
  for (; j + 16 <= cnt; j += 16) {
    replay16<false, SCALED, F32>(pp, ms, dl, j, 0xFFFF, c, sc, cc, bins, mass32, mass64);
  }
  if (j < cnt) {
    replay16<true, SCALED, F32>(pp, ms, dl, j, tail_mask(cnt - j), c, sc, cc, bins, mass32,
                                mass64);
  }
  cc.flush(counts7);
}

// The optimizers' fp32 storage step with statistics: p <- round_fp32(p * decay + delta)
// (alpha = 1, nearest-even) in the chosen sum mode, fused with its statistics (update_run's
// FP32NE storage loop followed by stats_run: the same outputs, bit for bit). The two-pass
// form kept five scratch arrays per run and spent about 1.1 ns per element on statistics
// at one thread (EmulatedAdamW's default policy pays it every step); here the values stay
// in registers and only the bins and the fp64 masses leave them. exact: 1 for the exact
// sum (one fma), 0 for PyTorch's fp32 sum (p * decay rounded, then + delta).
template <bool TAIL>
inline __attribute__((always_inline)) void storage16(
    uint32_t* __restrict__ p32, const float* __restrict__ dl, int64_t j, __mmask16 km,
    __mmask16 exact, const ReplayConsts& c, const ReplayScale& sc, LaneCounts& cc,
    int8_t* __restrict__ bins, double* __restrict__ mass64) {
  if (!TAIL) {
    _mm_prefetch(reinterpret_cast<const char*>(dl + j + kPrefetch), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(p32 + j + kPrefetch), _MM_HINT_T1);
  }
  const __m512i po = TAIL ? _mm512_maskz_loadu_epi32(km, p32 + j) : _mm512_loadu_si512(p32 + j);
  const __m512 dv = TAIL ? _mm512_maskz_loadu_ps(km, dl + j) : _mm512_loadu_ps(dl + j);
  const __m512 pv = _mm512_castsi512_ps(po);
  // storage_exact_fp32_ne_unit and storage_fp32_fp32_ne (fma(1, d, x) is d + x)
  const __m512i pe = _mm512_castps_si512(canon_ps(_mm512_fmadd_ps(pv, sc.decay, dv), c));
  const __m512i pf = _mm512_castps_si512(
      canon_ps(_mm512_add_ps(dv, canon_ps(_mm512_mul_ps(pv, sc.decay), c)), c));
  const __m512i pn = _mm512_mask_mov_epi32(pf, exact, pe);
  if (TAIL) _mm512_mask_storeu_epi32(p32 + j, km, pn);
  else _mm512_storeu_si512(p32 + j, pn);
  const __mmask16 differs = _mm512_mask_cmpneq_epi32_mask(km, pe, pf);
  // changed: stored bits differ, +0 == -0 (a NaN stored before: rare path below)
  const __mmask16 same = _mm512_cmpeq_epi32_mask(po, pn) |
                         _mm512_testn_epi32_mask(_mm512_or_si512(po, pn), c.abs32);
  __mmask16 changed = static_cast<__mmask16>(~same & km);
  // u = delta + (decay - 1) * p in fp64, as the portable loop forms it; zero test, bin
  const __m512d u_lo = sc.u(_mm512_castps512_ps256(dv), _mm512_castps512_ps256(pv));
  const __m512d u_hi = sc.u(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(dv), 1)),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(pv), 1)));
  const __m512d z = _mm512_setzero_pd();
  const __mmask16 zero = static_cast<__mmask16>(
      (_mm512_cmp_pd_mask(u_lo, z, _CMP_EQ_OQ) |
       (static_cast<unsigned>(_mm512_cmp_pd_mask(u_hi, z, _CMP_EQ_OQ)) << 8)) & km);
  const __m512i ue = f64_exponents(u_lo, u_hi);
  const __m512i ep = _mm512_and_si512(_mm512_srli_epi32(po, 23), c.ff32);
  __m512i k = _mm512_add_epi32(_mm512_sub_epi32(ue, _mm512_max_epi32(ep, c.one32)), c.bin_off64);
  k = _mm512_min_epi32(_mm512_max_epi32(k, c.zero32), c.top32);
  k = _mm512_mask_mov_epi32(k, zero | _mm512_cmpeq_epi32_mask(ue, c.e7ff), c.none32);
  __m128i k8 = _mm512_cvtepi32_epi8(k);
  // Rare: a non-finite delta, value stored before or after (exponent field all ones).
  const __mmask16 rare = static_cast<__mmask16>(
      (_mm512_fpclass_ps_mask(dv, 0x99) |
       _mm512_cmpeq_epi32_mask(_mm512_and_si512(po, c.inf32), c.inf32) |
       _mm512_cmpeq_epi32_mask(_mm512_and_si512(pn, c.inf32), c.inf32)) & km);
  if (__builtin_expect(rare != 0, 0)) {
    alignas(64) uint32_t pob[16], pnb[16], dbb[16];
    alignas(64) double ub[16];
    alignas(16) int8_t kb[16];
    _mm512_store_si512(pob, po);
    _mm512_store_si512(pnb, pn);
    _mm512_store_si512(dbb, _mm512_castps_si512(dv));
    _mm512_store_pd(ub, u_lo);
    _mm512_store_pd(ub + 8, u_hi);
    _mm_store_si128(reinterpret_cast<__m128i*>(kb), k8);
    for (int l = 0; l < 16; ++l) {
      if (!((rare >> l) & 1u)) continue;
      const uint32_t f = element_flags(pob[l], pnb[l], dbb[l], ub[l], 0u);
      cc.rare_lane(f, l, changed);
      kb[l] = static_cast<int8_t>(element_bin(pob[l], ub[l], c.emin, c.m, c.msub));
    }
    k8 = _mm_load_si128(reinterpret_cast<const __m128i*>(kb));
  }
  const __mmask16 absorbed = cc.add(km, changed, zero, differs, c.one32);
  if (TAIL) _mm_mask_storeu_epi8(bins + j, km, k8);
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(bins + j), k8);
  _mm512_mask_storeu_pd(mass64 + j, static_cast<__mmask8>(km),
                        absorbed_abs(u_lo, static_cast<__mmask8>(absorbed)));
  _mm512_mask_storeu_pd(mass64 + j + 8, static_cast<__mmask8>(km >> 8),
                        absorbed_abs(u_hi, static_cast<__mmask8>(absorbed >> 8)));
}

// Elements [0, cnt) of one run of the fp32 storage step (see storage16); sp is FP32's Spec.
inline void storage_fp32_ne_avx512(uint32_t* __restrict__ p32, const float* __restrict__ dl,
                                   int64_t cnt, const Spec& sp, float decay, bool exact,
                                   uint32_t* __restrict__ counts7, int8_t* __restrict__ bins,
                                   double* __restrict__ mass64) {
  const ReplayConsts c(sp);
  const ReplayScale sc(1.0f, decay);
  const __mmask16 ex = exact ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>(0);
  LaneCounts cc;
  int64_t j = 0;
  for (; j + 16 <= cnt; j += 16) {
    storage16<false>(p32, dl, j, 0xFFFF, ex, c, sc, cc, bins, mass64);
  }
  if (j < cnt) storage16<true>(p32, dl, j, tail_mask(cnt - j), ex, c, sc, cc, bins, mass64);
  cc.flush(counts7);
}

// The bf16 storage step without master weights, alpha = 1 and no decay (the replay step
// on a bf16 parameter alone): p <- round_bf16(p + delta), nearest-even, in the chosen sum
// mode, fused with its statistics (update_run's NARROW_NE storage loop with UNIT followed
// by stats_run: the same outputs, bit for bit). The exact sum is sum_odd32_unit in vector
// form (fp32 TwoSum, stepped back when it rounded away, last bit set when inexact); the
// "fp32" sum rounds fl32(p + delta). u = delta, so the statistics are replay16's 32-bit
// ones; masses go out as fp64 (the storage path's mass buffer).
template <bool TAIL>
inline __attribute__((always_inline)) void storage_bf16_unit16(
    uint16_t* __restrict__ p16, const float* __restrict__ dl, int64_t j, __mmask16 km,
    __mmask16 exact, const ReplayConsts& c, LaneCounts& cc, int8_t* __restrict__ bins,
    double* __restrict__ mass64) {
  if (!TAIL) {
    _mm_prefetch(reinterpret_cast<const char*>(dl + j + kPrefetch), _MM_HINT_T1);
    if ((j & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(p16 + j + kPrefetch), _MM_HINT_T1);
  }
  const __m512 dv = TAIL ? _mm512_maskz_loadu_ps(km, dl + j) : _mm512_loadu_ps(dl + j);
  const __m256i po = TAIL ? _mm256_maskz_loadu_epi16(km, p16 + j)
                          : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p16 + j));
  const __m512i pb = _mm512_slli_epi32(_mm512_cvtepu16_epi32(po), 16);
  const __m512 pv = _mm512_castsi512_ps(pb);
  const __m512i db = _mm512_castps_si512(dv);
  // sum_odd32_unit: s = p + d and its exact error e (TwoSum)
  const __m512 sv = _mm512_add_ps(pv, dv);
  const __m512 p_in_s = _mm512_sub_ps(sv, dv);
  const __m512 d_in_s = _mm512_sub_ps(sv, p_in_s);
  const __m512 e = _mm512_add_ps(_mm512_sub_ps(dv, d_in_s), _mm512_sub_ps(pv, p_in_s));
  const __m512i sb = _mm512_castps_si512(sv);
  const __mmask16 finite_in = static_cast<__mmask16>(
      ~(_mm512_cmpeq_epi32_mask(_mm512_and_si512(pb, c.inf32), c.inf32) |
        _mm512_cmpeq_epi32_mask(_mm512_and_si512(db, c.inf32), c.inf32)));
  const __mmask16 overflow =
      finite_in & _mm512_cmpeq_epi32_mask(_mm512_and_si512(sb, c.inf32), c.inf32);
  const __mmask16 inexact = static_cast<__mmask16>(
      _mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_NEQ_UQ) & ~overflow & finite_in);
  const __mmask16 away = inexact & _mm512_movepi32_mask(_mm512_xor_si512(_mm512_castps_si512(e), sb));
  __m512i odd = _mm512_mask_sub_epi32(sb, away, sb, c.one32);
  odd = _mm512_mask_or_epi32(odd, inexact, odd, c.one32);
  odd = _mm512_mask_mov_epi32(odd, overflow,
                              _mm512_or_si512(_mm512_andnot_si512(c.abs32, sb), c.max32));
  const __mmask16 snan = _mm512_cmp_ps_mask(sv, sv, _CMP_UNORD_Q);
  odd = _mm512_mask_mov_epi32(odd, snan, c.qnan);
  const __m512i fs = _mm512_mask_mov_epi32(sb, snan, c.qnan);  // the fp32 sum, canonical
  // nearest-even to bf16 of both (round_ne_uniform with d = 16, as replay16)
  const auto rne16 = [&](__m512i u) {
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), c.one32);
    return _mm512_cvtepi32_epi16(
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, c.rne_bias), lsb), 16));
  };
  const __m256i pe = rne16(odd), pf = rne16(fs);
  const __m256i pn = _mm256_mask_mov_epi16(pf, exact, pe);
  if (TAIL) _mm256_mask_storeu_epi16(p16 + j, km, pn);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p16 + j), pn);
  const __mmask16 differs = _mm256_mask_cmpneq_epi16_mask(km, pe, pf);
  // changed: stored bits differ, +0 == -0 (a NaN stored before: rare path below)
  const __mmask16 same = _mm256_cmpeq_epi16_mask(po, pn) |
                         _mm256_testn_epi16_mask(_mm256_or_si256(po, pn), c.abs16);
  __mmask16 changed = static_cast<__mmask16>(~same & km);
  // u = delta: zero test and histogram bin in 16-bit lanes (replay16)
  const __mmask16 zero = _mm512_mask_testn_epi32_mask(km, db, c.abs32);
  __m128i k8 = bins_delta16(db, po, zero, c);
  // Rare: a subnormal or non-finite delta, a non-finite value stored before or after.
  const __mmask16 rare = static_cast<__mmask16>(
      (_mm512_fpclass_ps_mask(dv, 0xB9) |
       _mm256_cmpeq_epi16_mask(_mm256_and_si256(po, c.exp16), c.exp16) |
       _mm256_cmpeq_epi16_mask(_mm256_and_si256(pn, c.exp16), c.exp16)) & km);
  if (__builtin_expect(rare != 0, 0)) {
    const __m512d none = _mm512_setzero_pd();  // u = delta: no fp64 u
    k8 = rare_lanes16<false, false>(rare, po, _mm512_setzero_si512(), pn, db, none, none, k8, c,
                                    cc, changed);
  }
  const __mmask16 absorbed = cc.add(km, changed, zero, differs, c.one32);
  if (TAIL) _mm_mask_storeu_epi8(bins + j, km, k8);
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(bins + j), k8);
  const __m512d u_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(dv));
  const __m512d u_hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(dv), 1)));
  _mm512_mask_storeu_pd(mass64 + j, static_cast<__mmask8>(km),
                        absorbed_abs(u_lo, static_cast<__mmask8>(absorbed)));
  _mm512_mask_storeu_pd(mass64 + j + 8, static_cast<__mmask8>(km >> 8),
                        absorbed_abs(u_hi, static_cast<__mmask8>(absorbed >> 8)));
}

// Elements [0, cnt) of one run of the bf16 storage step (see storage_bf16_unit16); sp is
// BF16's Spec.
inline void storage_bf16_unit_avx512(uint16_t* __restrict__ p16, const float* __restrict__ dl,
                                     int64_t cnt, const Spec& sp, bool exact,
                                     uint32_t* __restrict__ counts7, int8_t* __restrict__ bins,
                                     double* __restrict__ mass64) {
  const ReplayConsts c(sp);
  const __mmask16 ex = exact ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>(0);
  LaneCounts cc;
  int64_t j = 0;
  for (; j + 16 <= cnt; j += 16) storage_bf16_unit16<false>(p16, dl, j, 0xFFFF, ex, c, cc, bins, mass64);
  if (j < cnt) storage_bf16_unit16<true>(p16, dl, j, tail_mask(cnt - j), ex, c, cc, bins, mass64);
  cc.flush(counts7);
}

}  // namespace
}  // namespace cpu
}  // namespace gatesim
