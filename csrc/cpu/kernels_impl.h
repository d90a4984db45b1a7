// The CPU range kernels. Included once per ISA variant by kernels_<isa>.cpp, which
// defines GS_TABLE (the table's name) and GS_ISA_NAME first. Only our own headers
// and the C library may be included here: anything else compiled under a
// `#pragma GCC target` could leak wider instructions into shared inline code.
#include <cstdint>

#include "cpu/kernels.h"
#include "gatesim/adam.h"
#include "gatesim/philox.h"
#include "gatesim/rounding.h"
#include "cpu/philox_simd.h"
#include "cpu/update_impl.h"

namespace gatesim {
namespace cpu {
namespace {

template <int ENC>
struct Out;
template <> struct Out<kEncF32> { using T = uint32_t; };
template <> struct Out<kEncHi16> { using T = uint16_t; };
template <> struct Out<kEnc16> { using T = uint16_t; };
template <> struct Out<kEnc8> { using T = uint8_t; };

template <int ENC>
inline typename Out<ENC>::T encode(uint32_t r, const Spec& sp) {
  using T = typename Out<ENC>::T;
  if (ENC == kEncF32) return static_cast<T>(r);
  if (ENC == kEncHi16) return static_cast<T>(r >> 16);  // exact: r is a bf16 value
  return static_cast<T>(encode_bits(r, sp));
}

// Deterministic rounding: a plain elementwise loop the compiler vectorizes.
template <int MODE, bool UNIFORM, int ENC>
void quantize_plain(const uint32_t* __restrict__ x, void* yv, int64_t b, int64_t e,
                    const Spec& sp) {
  using T = typename Out<ENC>::T;
  T* __restrict__ y = static_cast<T*>(yv);
  const Spec s = sp;
  // `omp simd` marks the loop force-vectorize, which lets GCC if-convert it fully.
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    y[i] = encode<ENC>(round_bits<MODE, UNIFORM, uint32_t>(x[i], s, 0u), s);
  }
}

// Walks elements [b, e) in runs that share one 64-word stream block: fills the block's
// random words, then calls run(i, cnt, words) with the words of elements i .. i+cnt-1.
// Block boundaries follow stream positions, not chunk boundaries, so any chunking sees
// the same words.
template <class Run>
inline void for_each_random_run(int64_t b, int64_t e, uint64_t seed, uint64_t offset, Run run) {
  alignas(64) uint32_t rnd[64];
  int64_t i = b;
  while (i < e) {
    const uint64_t p = offset + static_cast<uint64_t>(i);
    const int64_t skip = static_cast<int64_t>(p & 63u);
    random_block64_simd(seed, p >> 6, rnd);
    const int64_t cnt = (64 - skip) < (e - i) ? (64 - skip) : (e - i);
    run(i, cnt, static_cast<const uint32_t*>(rnd + skip));
    i += cnt;
  }
}

// Stochastic rounding: random words 64 at a time, consumed by an elementwise loop.
template <bool UNIFORM, int ENC>
void quantize_stochastic(const uint32_t* __restrict__ x, void* yv, int64_t b, int64_t e,
                         const Spec& sp, uint64_t seed, uint64_t offset) {
  using T = typename Out<ENC>::T;
  T* __restrict__ y = static_cast<T*>(yv);
  const Spec s = sp;
  for_each_random_run(b, e, seed, offset, [&](int64_t i, int64_t cnt, const uint32_t* rr) {
    const uint32_t* __restrict__ xr = x + i;
    T* __restrict__ yr = y + i;
#pragma omp simd
    for (int64_t j = 0; j < cnt; ++j) {
      yr[j] = encode<ENC>(round_bits<kStochastic, UNIFORM, uint32_t>(xr[j], s, rr[j]), s);
    }
  });
}

template <bool UNIFORM, int ENC>
void quantize_mode(const uint32_t* x, void* y, int64_t b, int64_t e, const Spec& sp, int mode,
                   uint64_t seed, uint64_t offset) {
  switch (mode) {
    case kNearestEven: return quantize_plain<kNearestEven, UNIFORM, ENC>(x, y, b, e, sp);
    case kNearestAway: return quantize_plain<kNearestAway, UNIFORM, ENC>(x, y, b, e, sp);
    case kTowardZero: return quantize_plain<kTowardZero, UNIFORM, ENC>(x, y, b, e, sp);
    case kUp: return quantize_plain<kUp, UNIFORM, ENC>(x, y, b, e, sp);
    case kDown: return quantize_plain<kDown, UNIFORM, ENC>(x, y, b, e, sp);
    case kOdd: return quantize_plain<kOdd, UNIFORM, ENC>(x, y, b, e, sp);
    default: return quantize_stochastic<UNIFORM, ENC>(x, y, b, e, sp, seed, offset);
  }
}

void quantize_range(const uint32_t* x, void* y, int enc, int64_t b, int64_t e, const Spec& sp,
                    int mode, uint64_t seed, uint64_t offset) {
  if (sp.uniform) {
    switch (enc) {
      case kEncF32: return quantize_mode<true, kEncF32>(x, y, b, e, sp, mode, seed, offset);
      case kEncHi16: return quantize_mode<true, kEncHi16>(x, y, b, e, sp, mode, seed, offset);
      case kEnc16: return quantize_mode<true, kEnc16>(x, y, b, e, sp, mode, seed, offset);
      default: return quantize_mode<true, kEnc8>(x, y, b, e, sp, mode, seed, offset);
    }
  }
  switch (enc) {
    case kEncF32: return quantize_mode<false, kEncF32>(x, y, b, e, sp, mode, seed, offset);
    case kEnc16: return quantize_mode<false, kEnc16>(x, y, b, e, sp, mode, seed, offset);
    default: return quantize_mode<false, kEnc8>(x, y, b, e, sp, mode, seed, offset);
  }
}

void ulp_range(const uint32_t* __restrict__ x, uint32_t* __restrict__ y, int64_t b, int64_t e,
               const Spec& sp) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) y[i] = ulp_bits(x[i], sp);
}

// absorbed: delta != 0, w not NaN, and the format's rounding of the exact w + delta
// equals w (+0 and -0 count as equal, as in bitwise sparsity).
template <int MODE>
void absorbed_mode(const float* __restrict__ w, const float* __restrict__ dl, bool* __restrict__ y,
                   int64_t b, int64_t e, const Spec& sp, uint64_t seed, uint64_t offset) {
  const Spec s = sp;
  const int rcap = exact_sum_rcap(s);
  for (int64_t i = b; i < e; ++i) {
    const uint32_t rnd =
        MODE == kStochastic ? random_word(seed, offset + static_cast<uint64_t>(i)) : 0u;
    const uint32_t r = round_bits<MODE, false, uint64_t>(sum_to_odd(w[i], dl[i]), s, rnd, rcap);
    const uint32_t wb = f32_bits(w[i]);
    const bool same = r == wb || ((r | wb) & 0x7FFFFFFFu) == 0;
    const bool w_nan = (wb & 0x7FFFFFFFu) > 0x7F800000u;
    y[i] = dl[i] != 0.0f && !w_nan && same;
  }
}

void absorbed_range(const float* w, const float* dl, bool* y, int64_t b, int64_t e,
                    const Spec& sp, int mode, uint64_t seed, uint64_t offset) {
  switch (mode) {
    case kNearestEven: return absorbed_mode<kNearestEven>(w, dl, y, b, e, sp, seed, offset);
    case kNearestAway: return absorbed_mode<kNearestAway>(w, dl, y, b, e, sp, seed, offset);
    case kTowardZero: return absorbed_mode<kTowardZero>(w, dl, y, b, e, sp, seed, offset);
    case kUp: return absorbed_mode<kUp>(w, dl, y, b, e, sp, seed, offset);
    case kDown: return absorbed_mode<kDown>(w, dl, y, b, e, sp, seed, offset);
    case kOdd: return absorbed_mode<kOdd>(w, dl, y, b, e, sp, seed, offset);
    default: return absorbed_mode<kStochastic>(w, dl, y, b, e, sp, seed, offset);
  }
}

void random_bits_range(uint32_t* y, int64_t b, int64_t e, uint64_t seed, uint64_t offset) {
  for_each_random_run(b, e, seed, offset, [&](int64_t i, int64_t cnt, const uint32_t* rr) {
    for (int64_t j = 0; j < cnt; ++j) y[i + j] = rr[j];
  });
}

// (m * s) / (root / b + eps), three fp32 roundings and one more for the quotient, in
// torch's order (no contraction: the build uses -ffp-contract=off). No aliasing
// assumptions: out may be root or m itself (elementwise).
void adam_direction_range(const float* m, const float* root, float* out, int64_t b, int64_t e,
                          float bc2_sqrt, float eps, float s) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) out[i] = (m[i] * s) / (root[i] / bc2_sqrt + eps);
}

// exp_avg.lerp_(grad, w) and exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=a2) of
// elements [b, e) in the forms of the variant (gatesim/adam.h); the loop-invariant choices
// are template parameters, so that each loop vectorizes.
template <bool FMA, bool SMALL, int FORM>
void adam_moments_loop(const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                       int64_t b, int64_t e, const AdamCoef& c) {
  const float w = c.w1, wc = c.w1c, beta2 = c.beta2, a2 = c.a2;
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    const float gi = g[i];
    m[i] = adam_lerp<FMA, SMALL>(m[i], gi, w, wc);
    v[i] = adam_sq<FORM>(v[i], gi, beta2, a2);
  }
}

template <bool FMA, bool SMALL>
void adam_moments_form(const float* g, float* m, float* v, int64_t b, int64_t e,
                       const AdamCoef& c) {
  switch ((c.variant >> kAdamAddcmulShift) & 3) {
    case 0: return adam_moments_loop<FMA, SMALL, 0>(g, m, v, b, e, c);
    case 1: return adam_moments_loop<FMA, SMALL, 1>(g, m, v, b, e, c);
    case 2: return adam_moments_loop<FMA, SMALL, 2>(g, m, v, b, e, c);
    default: return adam_moments_loop<FMA, SMALL, 3>(g, m, v, b, e, c);
  }
}

void adam_moments_range(const float* g, float* m, float* v, int64_t b, int64_t e,
                        const AdamCoef& c) {
  const bool fma = (c.variant & kAdamLerpFma) != 0;
  const bool small = (c.w1 < 0.0f ? -c.w1 : c.w1) < 0.5f;
  if (fma && small) adam_moments_form<true, true>(g, m, v, b, e, c);
  else if (fma) adam_moments_form<true, false>(g, m, v, b, e, c);
  else if (small) adam_moments_form<false, true>(g, m, v, b, e, c);
  else adam_moments_form<false, false>(g, m, v, b, e, c);
  if (c.state_round) {  // each moment rounded after its own op: independent of each other
    for (int64_t i = b; i < e; ++i) {
      m[i] = adam_round_state(m[i], c.sps);
      v[i] = adam_round_state(v[i], c.sps);
    }
  }
}

// IEEE (correctly rounded) fp32 sqrt.
void sqrt_range(const float* x, float* y, int64_t b, int64_t e) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) y[i] = __builtin_sqrtf(x[i]);
}

}  // namespace

extern const KernelTable GS_TABLE = {GS_ISA_NAME,        quantize_range,     ulp_range,
                                     absorbed_range,     random_bits_range,  apply_update_range,
                                     adam_direction_range, adam_moments_range, sqrt_range};

}  // namespace cpu
}  // namespace gatesim
