// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
// Header-only and usable from host and device code, so CPU and CUDA kernels draw the
// very same random bits for the same (seed, position).
#pragma once
#include <cstdint>

#include "gatesim/platform.h"

namespace gatesim {

struct Philox4 {
  uint32_t v[4];
};

GS_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                        uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
  const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n1 = static_cast<uint32_t>(p1);
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  const uint32_t n3 = static_cast<uint32_t>(p0);
  c0 = n0; c1 = n1; c2 = n2; c3 = n3;
}

// Ten rounds with the standard Weyl key schedule; matches Random123's kat_vectors.
GS_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                            uint32_t k0, uint32_t k1) {
GS_UNROLL
  for (int r = 0; r < 10; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The random streams: position p (= offset + element index) of stream `st` takes one
// 32-bit word of Philox4x32-10 keyed by the 64-bit seed. Positions come in aligned
// blocks of 64; in block b = p / 64, position p uses word (p / 16) % 4 of the counter
// (b * 16 + p % 16, st) - the first 64-bit half holds the position part, the second the
// stream. quantize uses stream 0; apply_update uses 2 * step + k (k = 0 for the decay
// rounding, 1 for the update rounding). The layout lets a CPU fill 64 words with 16
// independent, vectorizable Philox calls and a GPU thread serve 4 positions with one
// call. A word depends on (seed, stream, p) alone, never on threads, chunking or device.
GS_HD uint64_t random_counter(uint64_t p) { return ((p >> 6) << 4) | (p & 15u); }
GS_HD int random_lane(uint64_t p) { return static_cast<int>((p >> 4) & 3u); }

GS_HD Philox4 philox_at(uint64_t seed, uint64_t counter, uint64_t stream) {
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                       static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

GS_HD uint32_t random_word(uint64_t seed, uint64_t p, uint64_t stream = 0) {
  return philox_at(seed, random_counter(p), stream).v[random_lane(p)];
}

// Fills out[0..63] with the words of positions 64*block .. 64*block + 63.
GS_HD void random_block64(uint64_t seed, uint64_t block, uint32_t* __restrict__ out,
                          uint64_t stream = 0) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t s0 = static_cast<uint32_t>(stream), s1 = static_cast<uint32_t>(stream >> 32);
  const uint64_t base = block << 4;
#pragma omp simd
  for (int j = 0; j < 16; ++j) {
    const uint64_t c = base + static_cast<uint64_t>(j);
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32),
                                    s0, s1, k0, k1);
    out[j] = r.v[0];
    out[16 + j] = r.v[1];
    out[32 + j] = r.v[2];
    out[48 + j] = r.v[3];
  }
}

}  // namespace gatesim
