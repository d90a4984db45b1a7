// Explicit-SIMD helpers of the CPU kernels. random_block64 (gatesim/philox.h) with
// explicit SIMD: 16 Philox4x32-10 calls at once.
// Compilers vectorize the scalar loop with 64-bit multiplies (vpmullq), which is
// several times slower than the widening 32x32->64 vpmuludq used here. The output
// is the same 64 words as random_block64; tests compare the two.
#pragma once
#include <cstdint>

#include "gatesim/philox.h"

#if defined(GS_ISA_AVX512) || defined(GS_ISA_AVX2)
#include <immintrin.h>
#endif

namespace gatesim {
namespace cpu {

#if defined(GS_ISA_AVX512)
inline void philox_mulhilo(__m512i c, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i ev = _mm512_mul_epu32(c, m);                         // even lanes
  const __m512i od = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);  // odd lanes
  lo = _mm512_mask_blend_epi32(0xAAAA, ev, _mm512_slli_epi64(od, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(ev, 32), od);
}

inline void random_block64_simd(uint64_t seed, uint64_t block, uint32_t* out,
                               uint64_t stream = 0) {
  const uint64_t base = block << 4;  // 16 consecutive counters; the high word is shared
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                  13, 14, 15));
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(base >> 32));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(stream));
  __m512i c3 = _mm512_set1_epi32(static_cast<int>(stream >> 32));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int r = 0; r < 10; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    philox_mulhilo(c0, m0, hi0, lo0);
    philox_mulhilo(c2, m1, hi1, lo1);
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  _mm512_storeu_si512(out, c0);
  _mm512_storeu_si512(out + 16, c1);
  _mm512_storeu_si512(out + 32, c2);
  _mm512_storeu_si512(out + 48, c3);
}
#elif defined(GS_ISA_AVX2)
inline void philox_mulhilo(__m256i c, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i ev = _mm256_mul_epu32(c, m);
  const __m256i od = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  lo = _mm256_blend_epi32(ev, _mm256_slli_epi64(od, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(ev, 32), od, 0xAA);
}

inline void random_block64_simd(uint64_t seed, uint64_t block, uint32_t* out,
                               uint64_t stream = 0) {
  const uint64_t base = block << 4;
  for (int half = 0; half < 2; ++half) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base + 8 * half)),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(base >> 32));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(stream));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(stream >> 32));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
    const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
    for (int r = 0; r < 10; ++r) {
      __m256i hi0, lo0, hi1, lo1;
      philox_mulhilo(c0, m0, hi0, lo0);
      philox_mulhilo(c2, m1, hi1, lo1);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t* o = out + 8 * half;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 48), c3);
  }
}
#else
inline void random_block64_simd(uint64_t seed, uint64_t block, uint32_t* out,
                               uint64_t stream = 0) {
  random_block64(seed, block, out, stream);
}
#endif

// Histogram of the bytes p[0..n) over bins 0..nbins-1 (other values are skipped).
// With SIMD: per bin, one byte compare + popcount per 64 (32) bytes; without: scalar
// increments into four interleaved sub-histograms.
#if defined(GS_ISA_AVX512)
inline void histogram_bytes(const int8_t* p, int64_t n, int nbins, int64_t* hist) {
  // Occupied range first: unsigned min skips -1 (255), signed max skips it too.
  __m512i vmin = _mm512_set1_epi8(-1), vmax = _mm512_set1_epi8(-1);
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {
    const __m512i x = _mm512_loadu_si512(p + k);
    vmin = _mm512_min_epu8(vmin, x);
    vmax = _mm512_max_epi8(vmax, x);
  }
  alignas(64) uint8_t mn[64];
  alignas(64) int8_t mx[64];
  _mm512_store_si512(mn, vmin);
  _mm512_store_si512(mx, vmax);
  int lo = 255, hi = -1;
  for (int j = 0; j < 64; ++j) {
    lo = mn[j] < lo ? mn[j] : lo;
    hi = mx[j] > hi ? mx[j] : hi;
  }
  for (int64_t j = k; j < n; ++j) {
    const int b = p[j];
    if (b >= 0) {
      lo = b < lo ? b : lo;
      hi = b > hi ? b : hi;
    }
  }
  hi = hi < nbins - 1 ? hi : nbins - 1;
  // Four bins per pass over the bytes: compare, then a masked byte increment into one
  // accumulator per bin (independent chains, one load per four bins); the byte counters
  // are summed with vpsadbw every 255 rounds, before they can wrap. Bins past hi are
  // counted too (their counts are 0 or, past nbins - 1, dropped).
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i zero = _mm512_setzero_si512();
  for (int b = lo; b <= hi; b += 4) {
    const __m512i v0 = _mm512_set1_epi8(static_cast<char>(b));
    const __m512i v1 = _mm512_set1_epi8(static_cast<char>(b + 1));
    const __m512i v2 = _mm512_set1_epi8(static_cast<char>(b + 2));
    const __m512i v3 = _mm512_set1_epi8(static_cast<char>(b + 3));
    uint64_t c[4] = {0, 0, 0, 0};
    int64_t i = 0;
    while (i + 64 <= n) {
      __m512i a0 = zero, a1 = zero, a2 = zero, a3 = zero;
      const int64_t stop = (n - i) / 64 < 255 ? i + ((n - i) / 64) * 64 : i + 255 * 64;
      for (; i < stop; i += 64) {
        const __m512i x = _mm512_loadu_si512(p + i);
        a0 = _mm512_mask_add_epi8(a0, _mm512_cmpeq_epi8_mask(x, v0), a0, ones);
        a1 = _mm512_mask_add_epi8(a1, _mm512_cmpeq_epi8_mask(x, v1), a1, ones);
        a2 = _mm512_mask_add_epi8(a2, _mm512_cmpeq_epi8_mask(x, v2), a2, ones);
        a3 = _mm512_mask_add_epi8(a3, _mm512_cmpeq_epi8_mask(x, v3), a3, ones);
      }
      c[0] += static_cast<uint64_t>(_mm512_reduce_add_epi64(_mm512_sad_epu8(a0, zero)));
      c[1] += static_cast<uint64_t>(_mm512_reduce_add_epi64(_mm512_sad_epu8(a1, zero)));
      c[2] += static_cast<uint64_t>(_mm512_reduce_add_epi64(_mm512_sad_epu8(a2, zero)));
      c[3] += static_cast<uint64_t>(_mm512_reduce_add_epi64(_mm512_sad_epu8(a3, zero)));
    }
    for (; i < n; ++i) {
      for (int j = 0; j < 4; ++j) c[j] += p[i] == b + j ? 1u : 0u;
    }
    for (int j = 0; j < 4 && b + j < nbins; ++j) hist[b + j] += static_cast<int64_t>(c[j]);
  }
}
#elif defined(GS_ISA_AVX2)
inline void histogram_bytes(const int8_t* p, int64_t n, int nbins, int64_t* hist) {
  for (int b = 0; b < nbins; ++b) {
    const __m256i vv = _mm256_set1_epi8(static_cast<char>(b));
    uint64_t c = 0;
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k));
      c += static_cast<uint64_t>(
          __builtin_popcount(static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(x, vv)))));
    }
    for (; k < n; ++k) c += p[k] == b ? 1u : 0u;
    hist[b] += static_cast<int64_t>(c);
  }
}
#else
inline void histogram_bytes(const int8_t* p, int64_t n, int nbins, int64_t* hist) {
  int64_t h[4][64] = {};
  for (int64_t k = 0; k < n; ++k) {
    const int b = p[k];
    if (b >= 0 && b < nbins) ++h[k & 3][b];
  }
  for (int b = 0; b < nbins; ++b) hist[b] += h[0][b] + h[1][b] + h[2][b] + h[3][b];
}
#endif

}  // namespace cpu
}  // namespace gatesim
