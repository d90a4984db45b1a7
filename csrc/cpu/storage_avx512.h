// The storage-only step in fp32 with nearest-even and statistics (the optimizers' default
// all-fp32 policy), in explicit AVX-512: p <- R(p * decay + alpha * delta) under both sum
// modes (the exact sum rounded once, and torch's fp32 mul then fma), the chosen one
// stored, the other compared (sum_differs), and the statistics of Stats16 from registers.
//
// Why by hand: the portable loop (update_impl.h) keeps the values before/after, u and
// the differs flag in scratch arrays for a separate statistics pass, which then cost as
// much as the update itself. The arithmetic is that of storage_exact_fp32_ne and
// storage_fp32_fp32_ne (gatesim/update.h) lane by lane, add_to_odd included; tests
// compare every instruction set's kernels and the numba twin bit for bit.
#pragma once
#include <cstdint>

#include <immintrin.h>

#include "cpu/stats_avx512.h"
#include "gatesim/update.h"

namespace gatesim {
namespace cpu {
namespace {

// canon64 / canon32 lane by lane: a NaN becomes the canonical +qNaN.
inline __m512d canon_pd(__m512d x) {
  return _mm512_mask_mov_pd(x, _mm512_cmp_pd_mask(x, x, _CMP_UNORD_Q),
                            _mm512_castsi512_pd(_mm512_set1_epi64(0x7FF8000000000000ll)));
}
inline __m512 canon_ps32(__m512 x) {
  return _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                            _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
}

// add_to_odd (gatesim/rounding.h) for 8 lanes: TwoSum, then round to odd.
inline __m512d add_to_odd8(__m512d a, __m512d b) {
  const __m512d s = _mm512_add_pd(a, b);
  const __m512d bb = _mm512_sub_pd(s, a);
  const __m512d err = _mm512_add_pd(_mm512_sub_pd(a, _mm512_sub_pd(s, bb)), _mm512_sub_pd(b, bb));
  const __m512i bits = _mm512_castpd_si512(s);
  const __m512i expm = _mm512_set1_epi64(0x7FF0000000000000ll);
  const __m512i one = _mm512_set1_epi64(1);
  const __mmask8 finite = _mm512_cmpneq_epi64_mask(_mm512_and_si512(bits, expm), expm);
  // err != 0.0 (true for NaN, as in C)
  const __mmask8 inexact = finite & _mm512_cmp_pd_mask(err, _mm512_setzero_pd(), _CMP_NEQ_UQ);
  const __mmask8 away =
      inexact & _mm512_movepi64_mask(_mm512_xor_si512(_mm512_castpd_si512(err), bits));
  __m512i odd = _mm512_mask_sub_epi64(bits, away, bits, one);
  odd = _mm512_mask_or_epi64(odd, inexact, odd, one);
  return canon_pd(_mm512_castsi512_pd(odd));
}

// Elements [0, cnt) of one run of fp32 storage p (read, then written) with delta dl.
inline void storage_fp32_ne_avx512(uint32_t* __restrict__ p, const float* __restrict__ dl,
                                   int64_t cnt, const UpdateArgs& a, uint32_t* __restrict__ counts7,
                                   int8_t* __restrict__ bins, double* __restrict__ mass) {
  Stats16 st(a.sp);
  const __m512 alpha = _mm512_set1_ps(a.alpha), decay = _mm512_set1_ps(a.decay);
  const __m512d alpha_d = _mm512_set1_pd(a.alpha), decay_d = _mm512_set1_pd(a.decay);
  const __m512d decay_m1 = _mm512_set1_pd(static_cast<double>(a.decay) - 1.0);
  const bool has_decay = a.decay != 1.0f;  // without decay the p term of u is 0 (xkeep)
  const bool exact = a.sum_mode == kSumExact;
  for (int64_t j = 0; j < cnt; j += 16) {
    const __mmask16 km = tail_mask(cnt - j);
    if (km == 0xFFFF) {
      _mm_prefetch(reinterpret_cast<const char*>(p + j + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(dl + j + kPrefetch), _MM_HINT_T0);
    }
    const __m512i po = _mm512_maskz_loadu_epi32(km, p + j);
    const __m512 pv = _mm512_castsi512_ps(po);
    const __m512 dv = _mm512_maskz_loadu_ps(km, dl + j);
    const __m512d p_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(pv));
    const __m512d p_hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(pv), 1)));
    const __m512d d_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(dv));
    const __m512d d_hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(dv), 1)));
    // the exact sum, rounded once (storage_exact_fp32_ne)
    const __m512d s_lo = add_to_odd8(canon_pd(_mm512_mul_pd(p_lo, decay_d)), canon_pd(_mm512_mul_pd(alpha_d, d_lo)));
    const __m512d s_hi = add_to_odd8(canon_pd(_mm512_mul_pd(p_hi, decay_d)), canon_pd(_mm512_mul_pd(alpha_d, d_hi)));
    const __m512 pe = canon_ps32(_mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(s_lo)),
                                                    _mm512_cvtpd_ps(s_hi), 1));
    // torch's fp32 arithmetic (storage_fp32_fp32_ne)
    const __m512 pf = canon_ps32(_mm512_fmadd_ps(alpha, dv, canon_ps32(_mm512_mul_ps(pv, decay))));
    const __m512i pei = _mm512_castps_si512(pe), pfi = _mm512_castps_si512(pf);
    const __m512i pn = exact ? pei : pfi;
    _mm512_mask_storeu_epi32(p + j, km, pn);
    // u = alpha * delta + (decay - 1) * p in fp64 (both products exact)
    __m512d u_lo = _mm512_mul_pd(alpha_d, d_lo), u_hi = _mm512_mul_pd(alpha_d, d_hi);
    if (has_decay) {
      u_lo = _mm512_add_pd(u_lo, _mm512_mul_pd(decay_m1, p_lo));
      u_hi = _mm512_add_pd(u_hi, _mm512_mul_pd(decay_m1, p_hi));
    }
    st.add16(po, pn, _mm512_castps_si512(dv), u_lo, u_hi, _mm512_cmpneq_epi32_mask(pei, pfi), km,
             bins + j, mass + j);
  }
  st.flush(counts7);
}

}  // namespace
}  // namespace cpu
}  // namespace gatesim
