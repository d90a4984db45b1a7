// Explicit-SIMD helpers of the CPU kernels. random_block64 (gatesim/philox.h) with
// explicit SIMD: 16 Philox4x32-10 calls at once.
// Compilers vectorize the scalar loop with 64-bit multiplies (vpmullq), which is
// several times slower than the widening 32x32->64 vpmuludq used here. The output
// is the same 64 words as random_block64; tests compare the two.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "gatesim/philox.h"
#include "gatesim/update.h"

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

// The statistics histogram (kHistBins = 34 bins) of 512 bytes at a time, bit-sliced: the
// bytes are transposed into eight 512-bit planes (plane j holds bit j of every byte: a
// GF(2) affine transform per 8 bytes, a byte permute, an 8 x 8 qword transpose), and the
// bytes equal to bin b are then one AND of planes or their complements (vpternlogq,
// sharing the upper bits' ANDs between bins) and one popcount: about 160 vector
// operations per 512 bytes, against about 500 for histogram_bytes above
// (which was a fifth of the replay step's time at one thread). Needs AVX512-VBMI, GFNI
// and AVX512-VPOPCNTDQ (Ice Lake, Zen 4 and later), checked at run time.
#define GS_HIST_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,gfni,avx512vpopcntdq")))

// GATESIM_HIST=cmp forces the compare-per-bin loop (tests hold both to the same counts).
inline bool hist_bitsliced_supported() {
  static const bool ok = [] {
    const char* force = std::getenv("GATESIM_HIST");
    if (force != nullptr && std::strcmp(force, "cmp") == 0) return false;
    return __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("gfni") &&
           __builtin_cpu_supports("avx512vpopcntdq");
  }();
  return ok;
}

// ternlog immediate of a & (b == sb) & (c == sc)
constexpr int tern_and_imm(int sb, int sc) { return 1 << (4 + 2 * sb + sc); }

template <int B>
GS_HIST_TARGET inline void hist_count_bin(const __m512i* h, __m512i p1, __m512i p0, __m512i* acc) {
  const __m512i m = _mm512_ternarylogic_epi64(h[B >> 2], p1, p0, tern_and_imm((B >> 1) & 1, B & 1));
  acc[B] = _mm512_add_epi64(acc[B], _mm512_popcnt_epi64(m));
}

template <std::size_t... B>
GS_HIST_TARGET inline void hist_count_bins(const __m512i* h, __m512i p1, __m512i p0, __m512i* acc,
                                           std::index_sequence<B...>) {
  (hist_count_bin<static_cast<int>(B)>(h, p1, p0, acc), ...);
}

// acc[b] (8 qword lanes) += the count of bytes equal to b in p[0..512), b < kHistBins.
GS_HIST_TARGET inline void hist_bitsliced512(const int8_t* p, __m512i* acc) {
  const __m512i unit = _mm512_set1_epi64(0x8040201008040201ll);  // byte j of a qword: 1 << j
  // byte 8j + q of the result <- byte 8q + j: plane j of the 64 bytes in qword j
  alignas(64) static constexpr uint8_t kGroup[64] = {
      0, 8, 16, 24, 32, 40, 48, 56, 1, 9, 17, 25, 33, 41, 49, 57, 2, 10, 18, 26, 34, 42,
      50, 58, 3, 11, 19, 27, 35, 43, 51, 59, 4, 12, 20, 28, 36, 44, 52, 60, 5, 13, 21, 29,
      37, 45, 53, 61, 6, 14, 22, 30, 38, 46, 54, 62, 7, 15, 23, 31, 39, 47, 55, 63};
  const __m512i group = _mm512_load_si512(kGroup);
  __m512i y[8];
  for (int i = 0; i < 8; ++i) {
    // byte j of qword q <- bit j of each of the qword's 8 bytes (data as the GF(2) matrix)
    const __m512i t = _mm512_gf2p8affine_epi64_epi8(unit, _mm512_loadu_si512(p + 64 * i), 0);
    y[i] = _mm512_permutexvar_epi8(group, t);  // qword j: plane j of bytes 64i..64i+63
  }
  // 8 x 8 qword transpose: pl[j] qword i = y[i] qword j
  __m512i a[8], b[8], pl[8];
  for (int i = 0; i < 8; i += 2) {
    a[i] = _mm512_unpacklo_epi64(y[i], y[i + 1]);      // q0 q0' q2 q2' q4 q4' q6 q6'
    a[i + 1] = _mm512_unpackhi_epi64(y[i], y[i + 1]);  // q1 q1' q3 q3' ...
  }
  const __m512i lo2 = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
  const __m512i hi2 = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
  for (int g = 0; g < 8; g += 4) {
    for (int r = 0; r < 2; ++r) {
      b[g + r] = _mm512_permutex2var_epi64(a[g + r], lo2, a[g + 2 + r]);      // planes r, 4 + r
      b[g + 2 + r] = _mm512_permutex2var_epi64(a[g + r], hi2, a[g + 2 + r]);  // planes 2 + r, 6 + r
    }
  }
  const __m512i lo4 = _mm512_set_epi64(11, 10, 9, 8, 3, 2, 1, 0);
  const __m512i hi4 = _mm512_set_epi64(15, 14, 13, 12, 7, 6, 5, 4);
  // b[r] (r < 4) holds planes (r&1) + 2(r>>1) and that + 4 for bytes 0..255; b[4 + r] for 256..511
  for (int r = 0; r < 4; ++r) {
    const int j = (r & 1) + 2 * (r >> 1);
    pl[j] = _mm512_permutex2var_epi64(b[r], lo4, b[4 + r]);
    pl[j + 4] = _mm512_permutex2var_epi64(b[r], hi4, b[4 + r]);
  }
  // bins < 64: bits 6 and 7 clear; then the upper bits b5 b4 and b3 b2 of each bin
  const __m512i low64 = _mm512_ternarylogic_epi64(pl[6], pl[7], pl[7], 0x03);  // ~(a | b)
  __m512i g[3], h[9];
  g[0] = _mm512_ternarylogic_epi64(low64, pl[5], pl[4], tern_and_imm(0, 0));
  g[1] = _mm512_ternarylogic_epi64(low64, pl[5], pl[4], tern_and_imm(0, 1));
  g[2] = _mm512_ternarylogic_epi64(low64, pl[5], pl[4], tern_and_imm(1, 0));
  h[0] = _mm512_ternarylogic_epi64(g[0], pl[3], pl[2], tern_and_imm(0, 0));
  h[1] = _mm512_ternarylogic_epi64(g[0], pl[3], pl[2], tern_and_imm(0, 1));
  h[2] = _mm512_ternarylogic_epi64(g[0], pl[3], pl[2], tern_and_imm(1, 0));
  h[3] = _mm512_ternarylogic_epi64(g[0], pl[3], pl[2], tern_and_imm(1, 1));
  h[4] = _mm512_ternarylogic_epi64(g[1], pl[3], pl[2], tern_and_imm(0, 0));
  h[5] = _mm512_ternarylogic_epi64(g[1], pl[3], pl[2], tern_and_imm(0, 1));
  h[6] = _mm512_ternarylogic_epi64(g[1], pl[3], pl[2], tern_and_imm(1, 0));
  h[7] = _mm512_ternarylogic_epi64(g[1], pl[3], pl[2], tern_and_imm(1, 1));
  h[8] = _mm512_ternarylogic_epi64(g[2], pl[3], pl[2], tern_and_imm(0, 0));
  static_assert(kHistBins <= 36, "h[] covers bins 0..35");
  hist_count_bins(h, pl[1], pl[0], acc, std::make_index_sequence<kHistBins>{});
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
