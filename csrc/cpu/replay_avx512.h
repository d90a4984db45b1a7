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

#include "gatesim/update.h"

namespace gatesim {
namespace cpu {
namespace {

// Software prefetch distance, in elements (4 KB of master, 4 KB of delta ahead). The
// statistics make the loop stop for its histogram and mass tree after every run; data
// requested this far ahead is in flight during those pauses, which the hardware
// prefetcher alone does not bridge (1 thread: 16.5 -> 15 ms on 4096 x 4096). A prefetch
// past the end of a buffer is harmless: prefetches never fault.
constexpr int64_t kPrefetch = 1024;

// 16 elements at j (lanes of km). Counts go to vector lanes (cc_*: changed, absorbed,
// zero) and, for the rare cases, to the scalar nonfinite counters nf[3].
struct ReplayConsts {
  __m512i abs32 = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i qnan = _mm512_set1_epi32(0x7FC00000);
  __m512i rne_bias = _mm512_set1_epi32(0x7FFF);
  __m512i one32 = _mm512_set1_epi32(1);
  __m512i abs_hi16 = _mm512_set1_epi32(0x7FFF);
  __m512i inf_hi16 = _mm512_set1_epi32(0x7F80);
  __m256i abs16 = _mm256_set1_epi16(0x7FFF);
  __m256i exp16 = _mm256_set1_epi16(0x7F80);
  __m256i ff16 = _mm256_set1_epi16(0xFF);
  __m256i one16 = _mm256_set1_epi16(1);
  __m256i zero16 = _mm256_setzero_si256();
  __m256i top16 = _mm256_set1_epi16(kHistBins - 1);
  __m256i none16 = _mm256_set1_epi16(-1);
  __m256i bin_off;  // m - kHistLo + 1: bin = E(u) - max(E(p), 1) + that (element_bin32_uniform)
  explicit ReplayConsts(int m) : bin_off(_mm256_set1_epi16(static_cast<int16_t>(m - kHistLo + 1))) {}
};

template <bool TAIL>
inline __attribute__((always_inline)) void replay16(
    uint16_t* __restrict__ p16, float* __restrict__ ms, const float* __restrict__ dl, int64_t j,
    __mmask16 km, int m, const ReplayConsts& c, __m512i& cc_changed, __m512i& cc_absorbed,
    __m512i& cc_zero, uint64_t* nf, int8_t* __restrict__ bins, float* __restrict__ mass) {
  if (!TAIL) {
    _mm_prefetch(reinterpret_cast<const char*>(ms + j + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(dl + j + kPrefetch), _MM_HINT_T0);
    if ((j & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(p16 + j + kPrefetch), _MM_HINT_T0);
  }
  const __m512 mv = TAIL ? _mm512_maskz_loadu_ps(km, ms + j) : _mm512_loadu_ps(ms + j);
  const __m512 dv = TAIL ? _mm512_maskz_loadu_ps(km, dl + j) : _mm512_loadu_ps(dl + j);
  const __m256i po = TAIL ? _mm256_maskz_loadu_epi16(km, p16 + j)
                          : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p16 + j));
  // master + delta in fp32, NaN made canonical (add32)
  __m512 m2 = _mm512_add_ps(mv, dv);
  m2 = _mm512_mask_mov_ps(m2, _mm512_cmp_ps_mask(m2, m2, _CMP_UNORD_Q),
                          _mm512_castsi512_ps(c.qnan));
  if (TAIL) _mm512_mask_storeu_ps(ms + j, km, m2);
  else _mm512_storeu_ps(ms + j, m2);
  // nearest-even to bf16 (round_ne_uniform with d = 16: m2's NaN is already +qNaN, and
  // no carry reaches the sign: the largest sum, NaN's, stays below 2^31)
  const __m512i u = _mm512_castps_si512(m2);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), c.one32);
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, c.rne_bias), lsb), 16);
  const __m256i pn = _mm512_cvtepi32_epi16(r);
  if (TAIL) _mm256_mask_storeu_epi16(p16 + j, km, pn);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p16 + j), pn);

  // changed: stored bits differ, +0 == -0 (a NaN stored before: rare path below)
  const __mmask16 same = _mm256_cmpeq_epi16_mask(po, pn) |
                         _mm256_testn_epi16_mask(_mm256_or_si256(po, pn), c.abs16);
  __mmask16 changed = static_cast<__mmask16>(~same & km);
  const __m512i db = _mm512_castps_si512(dv);
  const __mmask16 zero = _mm512_mask_testn_epi32_mask(km, db, c.abs32);
  // histogram bin from the two biased exponents, in 16-bit lanes
  const __m256i eu = _mm256_and_si256(_mm512_cvtepi32_epi16(_mm512_srli_epi32(db, 23)), c.ff16);
  const __m256i ep = _mm256_and_si256(_mm256_srli_epi16(po, 7), c.ff16);
  __m256i k = _mm256_add_epi16(_mm256_sub_epi16(eu, _mm256_max_epi16(ep, c.one16)), c.bin_off);
  k = _mm256_min_epi16(_mm256_max_epi16(k, c.zero16), c.top16);
  k = _mm256_mask_mov_epi16(k, zero, c.none16);
  // Rare: a subnormal or non-finite delta (one fpclass: NaN, inf, denormal), a
  // non-finite value stored before (exponent field all ones) or after (r >= inf).
  const __mmask16 rare =
      (_mm512_fpclass_ps_mask(dv, 0xB9) |
       _mm256_cmpeq_epi16_mask(_mm256_and_si256(po, c.exp16), c.exp16) |
       _mm512_cmpge_epu32_mask(_mm512_and_si512(r, c.abs_hi16), c.inf_hi16)) & km;
  if (__builtin_expect(rare != 0, 0)) {
    alignas(32) uint16_t pob[16], pnb[16];
    alignas(64) uint32_t dbb[16];
    alignas(32) int16_t kb[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(pob), po);
    _mm256_store_si256(reinterpret_cast<__m256i*>(pnb), pn);
    _mm512_store_si512(dbb, db);
    _mm256_store_si256(reinterpret_cast<__m256i*>(kb), k);
    for (int l = 0; l < 16; ++l) {
      if (!((rare >> l) & 1u)) continue;
      const uint32_t o = static_cast<uint32_t>(pob[l]) << 16;
      const uint32_t n = static_cast<uint32_t>(pnb[l]) << 16;
      const uint32_t f = element_flags(o, n, dbb[l], static_cast<double>(bits_f32(dbb[l])), 0u);
      changed = static_cast<__mmask16>((changed & ~(1u << l)) | ((f & 1u) << l));
      nf[0] += (f >> 3) & 1u;
      nf[1] += (f >> 4) & 1u;
      nf[2] += (f >> 5) & 1u;
      kb[l] = static_cast<int16_t>(element_bin32_uniform(o, dbb[l], m));
    }
    k = _mm256_load_si256(reinterpret_cast<const __m256i*>(kb));
  }
  const __mmask16 absorbed = static_cast<__mmask16>(~zero & ~changed & km);
  cc_changed = _mm512_mask_add_epi32(cc_changed, changed, cc_changed, c.one32);
  cc_absorbed = _mm512_mask_add_epi32(cc_absorbed, absorbed, cc_absorbed, c.one32);
  cc_zero = _mm512_mask_add_epi32(cc_zero, zero, cc_zero, c.one32);
  const __m128i k8 = _mm256_cvtepi16_epi8(k);
  const __m512i am = _mm512_maskz_and_epi32(absorbed, db, c.abs32);
  if (TAIL) {
    _mm_mask_storeu_epi8(bins + j, km, k8);
    _mm512_mask_storeu_epi32(mass + j, km, am);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bins + j), k8);
    _mm512_storeu_si512(mass + j, am);
  }
}

// Elements [0, cnt) of one run; p16 is the bf16 parameter (read, then written), ms the
// master (read, then written), dl the delta. m: the format's mantissa bits (7).
inline void replay_bf16_ne_avx512(uint16_t* __restrict__ p16, float* __restrict__ ms,
                                  const float* __restrict__ dl, int64_t cnt, int m,
                                  uint32_t* __restrict__ counts7, int8_t* __restrict__ bins,
                                  float* __restrict__ mass) {
  const ReplayConsts c(m);
  __m512i cc_changed = _mm512_setzero_si512(), cc_absorbed = cc_changed, cc_zero = cc_changed;
  uint64_t nf[3] = {0, 0, 0};
  int64_t j = 0;
  for (; j + 16 <= cnt; j += 16) {
    replay16<false>(p16, ms, dl, j, 0xFFFF, m, c, cc_changed, cc_absorbed, cc_zero, nf, bins, mass);
  }
  if (j < cnt) {
    const __mmask16 km = static_cast<__mmask16>((1u << (cnt - j)) - 1u);
    replay16<true>(p16, ms, dl, j, km, m, c, cc_changed, cc_absorbed, cc_zero, nf, bins, mass);
  }
  // lane counts stay far below 2^31 (a run is at most one block)
  counts7[0] += static_cast<uint32_t>(_mm512_reduce_add_epi32(cc_changed));
  counts7[1] += static_cast<uint32_t>(_mm512_reduce_add_epi32(cc_absorbed));
  counts7[2] += static_cast<uint32_t>(_mm512_reduce_add_epi32(cc_zero));
  counts7[3] += static_cast<uint32_t>(nf[0]);
  counts7[4] += static_cast<uint32_t>(nf[1]);
  counts7[5] += static_cast<uint32_t>(nf[2]);
}

}  // namespace
}  // namespace cpu
}  // namespace gatesim
