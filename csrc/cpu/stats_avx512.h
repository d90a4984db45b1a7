// stats_run (update_impl.h) in explicit AVX-512: the statistics of one run of the general
// apply_update paths (storage-only, master with scaling or decay, Kahan) from the
// before/after values the update loop kept.
//
// Why by hand: the portable loop keeps seven vector reductions and mixes 32-bit flags
// with the fp64 update u; GCC's code for it cost about 1.8 ns per element on one core,
// twice the update itself (EmulatedAdamW's every step pays it). Here the flags are mask
// registers, counted by masked adds into vector lanes, and u is handled as two vectors of
// eight doubles per 16 elements. Same results as stats_run, bit for bit: the per-element
// definitions are those of element_flags / element_bin (gatesim/update.h), and tests
// compare every instruction set's kernels and the numba twin.
#pragma once
#include <cstdint>

#include <immintrin.h>

#include "gatesim/update.h"

namespace gatesim {
namespace cpu {
namespace {

// Software prefetch distance, in elements (8 KB of master, 8 KB of delta ahead), into L2
// (prefetcht1: the fused loops' users in replay_avx512.h). At one thread the replay step
// waits on memory: a single core keeps too few misses in flight for its five streams, and
// the statistics' work between runs lets the streams idle. Prefetching this far into L2
// keeps more lines in flight without evicting the run's L1 scratch (4096 x 4096, one
// thread, medians of interleaved runs: 1024 elements into L1 13.3-17.8 ms; 2048 into L2
// 11.5-12.6 ms; 4096 and 8192 into L2 12.2-13.4 ms). A prefetch past the end of a buffer
// is harmless: prefetches never fault.
constexpr int64_t kPrefetch = 2048;

// The 8 exponent fields of u's doubles as 32-bit lanes, lo in lanes 0..7, hi in 8..15.
inline __m512i f64_exponents(__m512d lo, __m512d hi) {
  const __m512i m = _mm512_set1_epi64(0x7FF);
  const __m256i a = _mm512_cvtepi64_epi32(_mm512_and_si512(_mm512_srli_epi64(_mm512_castpd_si512(lo), 52), m));
  const __m256i b = _mm512_cvtepi64_epi32(_mm512_and_si512(_mm512_srli_epi64(_mm512_castpd_si512(hi), 52), m));
  return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

// |u| as stats_run takes it (u < 0 ? -u : u: a NaN keeps its sign), absorbed lanes only.
inline __m512d absorbed_abs(__m512d u, __mmask8 absorbed) {
  const __mmask8 neg = _mm512_cmp_pd_mask(u, _mm512_setzero_pd(), _CMP_LT_OQ);
  const __m512d a = _mm512_mask_xor_pd(u, neg, u, _mm512_castsi512_pd(_mm512_set1_epi64(
                                                      static_cast<long long>(0x8000000000000000ull))));
  return _mm512_maskz_mov_pd(absorbed, a);
}

// The statistics of 16 elements from registers: stored bits before (o) and after (n),
// delta's bits (d), the fp64 update u (lanes 0-7 in u0, 8-15 in u1) and the lanes where
// the other sum mode differs; counts accumulate in vector lanes (flush() adds them up).
struct Stats16 {
  __m512i abs32 = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i inf32 = _mm512_set1_epi32(0x7F800000);
  __m512i man32 = _mm512_set1_epi32(0x7FFFFF);
  __m512i one32 = _mm512_set1_epi32(1);
  __m512i e7ff = _mm512_set1_epi32(0x7FF);
  __m512i top = _mm512_set1_epi32(kHistBins - 1);
  __m512i none = _mm512_set1_epi32(-1);
  // bin = (E(u) - 1023) - q - kHistLo + 1
  __m512i bin_off = _mm512_set1_epi32(-1023 - kHistLo + 1);
  __m512i emin, m, q_sub;
  __m512i cc[7];
  explicit Stats16(const Spec& spec)
      : emin(_mm512_set1_epi32(spec.emin)), m(_mm512_set1_epi32(spec.m)),
        q_sub(_mm512_set1_epi32(spec.emin - spec.msub)) {
    for (int f = 0; f < 7; ++f) cc[f] = _mm512_setzero_si512();
  }

  inline __attribute__((always_inline)) void add16(__m512i o, __m512i n, __m512i d, __m512d u0,
                                                   __m512d u1, __mmask16 differs, __mmask16 km,
                                                   int8_t* bins, double* mass) {
    const __m512d zero64 = _mm512_setzero_pd();
    const __mmask8 k0 = static_cast<__mmask8>(km), k1 = static_cast<__mmask8>(km >> 8);
    // flags, as element_flags
    const __m512i ao = _mm512_and_si512(o, abs32);
    const __mmask16 same = _mm512_cmpeq_epi32_mask(o, n) |
                           _mm512_testn_epi32_mask(_mm512_or_si512(o, n), abs32);
    const __mmask16 old_nan = _mm512_cmpgt_epu32_mask(ao, inf32);
    const __mmask16 changed = static_cast<__mmask16>((~same | old_nan) & km);
    const __mmask16 zero = static_cast<__mmask16>(
        (_mm512_cmp_pd_mask(u0, zero64, _CMP_EQ_OQ) |
         (static_cast<unsigned>(_mm512_cmp_pd_mask(u1, zero64, _CMP_EQ_OQ)) << 8)) & km);
    const __mmask16 absorbed = static_cast<__mmask16>(~zero & ~changed & km);
    const __mmask16 nf_o = _mm512_cmpeq_epi32_mask(_mm512_and_si512(o, inf32), inf32) & km;
    const __mmask16 flags[7] = {
        changed, absorbed, zero, _mm512_cmpeq_epi32_mask(_mm512_and_si512(d, inf32), inf32) & km,
        nf_o, _mm512_cmpeq_epi32_mask(_mm512_and_si512(n, inf32), inf32) & km,
        static_cast<__mmask16>(differs & km)};
    for (int f = 0; f < 7; ++f) cc[f] = _mm512_mask_add_epi32(cc[f], flags[f], cc[f], one32);
    // histogram bin, as element_bin: ulp exponent of the stored value (ulp_exp_of)...
    const __m512i E = _mm512_srli_epi32(ao, 23);
    const __m512i en = _mm512_sub_epi32(_mm512_max_epi32(E, one32), _mm512_set1_epi32(127));
    const __m512i sub_f = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_or_si512(_mm512_and_si512(ao, man32), one32)));
    const __m512i es = _mm512_sub_epi32(_mm512_srli_epi32(sub_f, 23), _mm512_set1_epi32(127 + 149));
    const __m512i e = _mm512_mask_mov_epi32(en, _mm512_testn_epi32_mask(E, E), es);
    const __mmask16 normal = _mm512_test_epi32_mask(ao, ao) & _mm512_cmpge_epi32_mask(e, emin);
    const __m512i q = _mm512_mask_sub_epi32(q_sub, normal, e, m);
    // ... and the exponent of u
    const __m512i ue = f64_exponents(u0, u1);
    __m512i k = _mm512_add_epi32(_mm512_sub_epi32(ue, q), bin_off);
    k = _mm512_min_epi32(_mm512_max_epi32(k, _mm512_setzero_si512()), top);
    const __mmask16 no_bin = zero | _mm512_cmpeq_epi32_mask(ue, e7ff) | nf_o;
    k = _mm512_mask_mov_epi32(k, no_bin, none);
    _mm_mask_storeu_epi8(bins, km, _mm512_cvtepi32_epi8(k));
    _mm512_mask_storeu_pd(mass, k0, absorbed_abs(u0, static_cast<__mmask8>(absorbed)));
    _mm512_mask_storeu_pd(mass + 8, k1, absorbed_abs(u1, static_cast<__mmask8>(absorbed >> 8)));
  }

  // lane counts stay far below 2^31 (a run is at most one block)
  void flush(uint32_t* counts7) const {
    for (int f = 0; f < 7; ++f) counts7[f] += static_cast<uint32_t>(_mm512_reduce_add_epi32(cc[f]));
  }
};

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

inline void stats_run_avx512(const uint32_t* __restrict__ po, const uint32_t* __restrict__ pn,
                             const double* __restrict__ u, const uint32_t* __restrict__ db,
                             const uint32_t* __restrict__ differs, int64_t cnt, const Spec& spec,
                             uint32_t* __restrict__ counts7, int8_t* __restrict__ bins,
                             double* __restrict__ mass) {
  Stats16 st(spec);
  for (int64_t j = 0; j < cnt; j += 16) {
    const __mmask16 km = tail_mask(cnt - j);
    const __mmask8 k0 = static_cast<__mmask8>(km), k1 = static_cast<__mmask8>(km >> 8);
    const __m512i df = _mm512_maskz_loadu_epi32(km, differs + j);
    st.add16(_mm512_maskz_loadu_epi32(km, po + j), _mm512_maskz_loadu_epi32(km, pn + j),
             _mm512_maskz_loadu_epi32(km, db + j), _mm512_maskz_loadu_pd(k0, u + j),
             _mm512_maskz_loadu_pd(k1, u + j + 8), _mm512_test_epi32_mask(df, df), km, bins + j,
             mass + j);
  }
  st.flush(counts7);
}

}  // namespace
}  // namespace cpu
}  // namespace gatesim
