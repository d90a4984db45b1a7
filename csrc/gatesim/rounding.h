// Bit-exact rounding of binary floating-point values into narrower formats.
//
// Header-only, integer-only (apart from exact IEEE additions in sum_to_odd), and
// usable from host and device code: the CPU kernels (every ISA variant) and the CUDA
// kernels all call these functions, so they cannot disagree.
//
// The central observation: for a finite non-negative IEEE value, the bit pattern read
// as an unsigned integer ("a-space") is monotone in the value, and within one binade
// (and across the whole subnormal range plus the first normal binade) consecutive
// integers are equally spaced values. Rounding to a coarser grid whose spacing is 2^d
// source ulps is therefore "clear the low d bits, maybe add 2^d", and a carry out of
// the mantissa moves into the next binade exactly as the value does.
#pragma once
#include <cstdint>
#include <cstring>

#include "gatesim/platform.h"

namespace gatesim {

// Rounding modes; the numbers are the op-level ABI shared with gatesim/formats.py.
enum Mode : int32_t {
  kNearestEven = 0,  // IEEE roundTiesToEven
  kNearestAway = 1,  // IEEE roundTiesToAway
  kTowardZero = 2,   // IEEE roundTowardZero
  kUp = 3,           // IEEE roundTowardPositive
  kDown = 4,         // IEEE roundTowardNegative
  kOdd = 5,          // round to odd: truncate, set the last bit if inexact
  kStochastic = 6,   // away from zero with probability = fraction of the gap
  kNumModes = 7,
};

// Storage encodings of values (quantize outputs, apply_update parameters).
enum Enc : int {
  kEncF32 = 0,   // fp32 bits
  kEncHi16 = 1,  // bf16: the high half of the fp32 bits
  kEnc16 = 2,    // any format of <= 16 bits, right-aligned (fp16)
  kEnc8 = 3,     // any format of <= 8 bits (fp8)
};

// Everything a kernel needs about the target format. Built by make_spec from the
// six numbers that define a format; gatesim.Format derives the same quantities in
// Python and the tests hold the two together.
struct Spec {
  int32_t ebits;      // exponent field width
  int32_t m;          // stored mantissa bits
  int32_t bias;       // exponent bias
  int32_t emin;       // exponent of the smallest normal value
  int32_t msub;       // mantissa bits below 2^emin: m with subnormals, 0 without
  uint32_t max_bits;  // fp32 bits of the largest finite magnitude
  uint32_t q_bits;    // fp32 bits of the smallest non-zero magnitude, 2^(emin - msub)
  bool has_inf;       // the format encodes infinities
  bool nan_all_ones;  // OCP "fn": NaN is the all-ones pattern, no infinities
  bool saturate;      // overflow and infinite inputs go to +-largest finite
  uint32_t inf_result;  // fp32 bits given where infinity is due: inf, max (saturate) or NaN
  bool uniform;       // fp32's exponent range with subnormals: a fixed d = 23 - m
  uint32_t m_mask;    // all ones if m > 0, else 0 (arithmetic select in vector loops)
  bool fast_ne;       // round_ne_uniform applies: uniform, IEEE specials, inf, no saturation
  // Stochastic rounding in uniform formats (d = 23 - m for every value): the shifts and
  // masks of the decision, precomputed so vector loops see plain loop-invariant integers
  // (GCC turns an in-loop derivation back into selects on a scalar condition, which it
  // then cannot vectorize).
  int32_t sr_lsh, sr_rsh, sr_rshift;
  uint32_t sr_rmask, sr_ones;
  int32_t rand_bits;  // stochastic: random bits per decision; 0 = every dropped bit (max 32)
};

GS_HD uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}
GS_HD float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
GS_HD uint64_t f64_bits(double f) {
  uint64_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}
GS_HD double bits_f64(uint64_t u) {
  double f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// fp32 bits of 2^k for -149 <= k <= 127 (subnormal powers included).
GS_HD uint32_t pow2_bits(int k) {
  return k >= -126 ? static_cast<uint32_t>(k + 127) << 23 : (1u << (k + 149));
}

// Derives the kernel constants. The caller has validated the parameters (Python
// raises ValueError naming the parameter); the op layer re-checks them with TORCH_CHECK.
GS_HD Spec make_spec(int ebits, int m, int bias, bool subnormals, bool has_inf,
                     bool nan_all_ones, bool saturate, int rand_bits) {
  Spec s;
  s.ebits = ebits;
  s.m = m;
  s.bias = bias;
  s.emin = 1 - bias;
  s.msub = subnormals ? m : 0;
  const int top = (1 << ebits) - 1;  // all-ones exponent field
  int emax;
  uint32_t maxmant;  // largest finite mantissa field
  const uint32_t ones = (m > 0) ? ((1u << m) - 1u) : 0u;
  if (nan_all_ones) {
    // Top exponent holds finite values except the all-ones mantissa (NaN). With no
    // mantissa bits the whole top exponent is NaN.
    emax = (m > 0 ? top : top - 1) - bias;
    maxmant = (m > 0) ? ones - 1u : 0u;
  } else {
    emax = (top - 1) - bias;  // top exponent reserved for inf/NaN
    maxmant = ones;
  }
  s.max_bits = (static_cast<uint32_t>(emax + 127) << 23) | (maxmant << (23 - m));
  s.q_bits = pow2_bits(s.emin - s.msub);
  s.has_inf = has_inf;
  s.nan_all_ones = nan_all_ones;
  s.saturate = saturate;
  s.inf_result = saturate ? s.max_bits : (has_inf ? 0x7F800000u : 0x7FC00000u);
  s.uniform = (ebits == 8 && bias == 127 && subnormals);
  s.m_mask = m > 0 ? 0xFFFFFFFFu : 0u;
  s.fast_ne = s.uniform && has_inf && !nan_all_ones && !saturate && m < 23;
  s.rand_bits = rand_bits;
  {
    const int d = 23 - m;
    const int r = rand_bits ? rand_bits : (d < 32 ? d : 32);
    s.sr_lsh = r > d ? r - d : 0;
    s.sr_rsh = d > r ? d - r : 0;  // < 32: d <= 23
    s.sr_rshift = 32 - (r > 0 ? r : 1);
    s.sr_rmask = r > 0 ? 0xFFFFFFFFu : 0u;
    s.sr_ones = r >= 32 ? 0xFFFFFFFFu : ((1u << r) - 1u);
  }
  return s;
}

// Source word layouts: fp32 (quantize) and fp64 (exact sums, see sum_to_odd).
template <typename U>
struct Src;
template <>
struct Src<uint32_t> {
  static constexpr int M = 23, BIAS = 127, W = 32;
  static constexpr uint32_t ABS = 0x7FFFFFFFu, INF = 0x7F800000u;
  GS_HD static uint32_t from_f32(uint32_t b) { return b; }
  GS_HD static uint32_t to_f32(uint32_t b) { return b; }
};
template <>
struct Src<uint64_t> {
  static constexpr int M = 52, BIAS = 1023, W = 64;
  static constexpr uint64_t ABS = 0x7FFFFFFFFFFFFFFFull, INF = 0x7FF0000000000000ull;
  GS_HD static uint64_t from_f32(uint32_t b) {
    return f64_bits(static_cast<double>(bits_f32(b)));
  }
  // Exact: only called on values representable in fp32 (or overflowed, then unused).
  GS_HD static uint32_t to_f32(uint64_t b) {
    return f32_bits(static_cast<float>(bits_f64(b)));
  }
};

// floor(log2 |x|) of a non-zero fp32 subnormal with magnitude bits a (< 2^23): the
// int -> float conversion is exact and vectorizes, unlike a count-leading-zeros.
GS_HD int subnormal_exp(uint32_t a) {
  return static_cast<int>(f32_bits(static_cast<float>(static_cast<int32_t>(a))) >> 23) - 127 - 149;
}

// Branch-free select: pick ? b : a, with pick 0 or 1.
GS_HD uint32_t blend(uint32_t a, uint32_t b, uint32_t pick) {
  return a ^ ((a ^ b) & (0u - pick));
}

// x >> n, 0 once n reaches the width. Masks instead of a select: when n is the same for
// every element (uniform formats), GCC cannot vectorize a select on that scalar condition.
template <typename U>
GS_HD U shr_sat(U x, int n) {
  constexpr int W = static_cast<int>(sizeof(U) * 8);
  const int sh = n < 0 ? 0 : (n < W ? n : W - 1);  // callers mask out n < 0 results
  const U keep = U(0) - static_cast<U>(n < W ? 1 : 0);
  return (x >> sh) & keep;
}

// Whether an overflow in this mode goes to infinity (else to the largest finite),
// per IEEE 754-2019 7.4; round-to-odd truncates, stochastic rounds away.
template <int MODE>
GS_HD uint32_t overflow_to_inf(uint32_t sign) {  // 1: infinity, 0: largest finite
  if (MODE == kTowardZero || MODE == kOdd) return 0u;
  if (MODE == kUp) return sign ^ 1u;
  if (MODE == kDown) return sign;
  return 1u;
}

// Rounds the finite magnitude `a` (source bits; sign only matters for up/down) to the
// format and returns the result's magnitude in source bits. `ovf` is 1 when the
// rounded magnitude exceeds the largest finite value. `rnd` is the 32-bit random word
// (stochastic mode only); `rcap` caps the random bits used (see sum_to_odd).
template <int MODE, bool UNIFORM, typename U>
GS_HD U round_magnitude(U a, uint32_t sign, const Spec& sp, uint32_t rnd, int rcap,
                        U max_src, U q_src, U& ovf) {
  using T = Src<U>;
  // Exponent arithmetic stays in the word type U (GCC vectorizes poorly across mixed
  // int/unsigned chains). Eb = biased exponent, with subnormals counted as 1.
  const U Ef = a >> T::M;
  const U Eb = Ef > U(1) ? Ef : U(1);
  const int e = static_cast<int>(Eb) - T::BIAS;  // binade exponent
  const U sig = Ef != 0 ? ((a & ((U(1) << T::M) - 1)) | (U(1) << T::M)) : a;
  // d = number of source-ulp bits below the format's last bit at this magnitude.
  // Source subnormals (Ef == 0) lie below every format's 2^emin (emin >= -126), except
  // in uniform formats, whose subnormal grid is the source's. Their a-space unit is
  // that of e = source emin, which is what e holds for them.
  const bool normal = UNIFORM || (Ef != 0 && e >= sp.emin);
  int d;
  bool tiny;  // |x| < smallest non-zero format value: candidates are 0 and q
  if (UNIFORM) {
    d = T::M - sp.m;
    tiny = false;
  } else {
    d = normal ? T::M - sp.m : T::M - sp.msub + (sp.emin - e);
    tiny = d > T::M;
  }
  const int dn = tiny ? 0 : d;
  const U k = a >> dn;                                 // truncated, in units of 2^d
  const U rem = tiny ? sig : (a & ((U(1) << dn) - 1));  // dropped part; < 2^d

  // Last bit of the truncated result's encoding, for ties-to-even and round-to-odd.
  // With no mantissa bits the encoding's last bit is the biased exponent's; below
  // 2^emin it is the subnormal significand's; a tiny value truncates to zero (even).
  // (Written as selects, not branches, so loops over elements vectorize.)
  // Decisions are kept as 0/1 integers of the word type rather than bools: GCC's
  // vectorizer rejects loops that mix bool patterns with wide integer arithmetic.
  // (a mask, not a select on the loop-invariant m > 0: GCC cannot vectorize the latter)
  const U mm = static_cast<U>(sp.m_mask);
  const U lsb_norm = ((k & mm) | ((Eb + static_cast<U>(sp.bias - T::BIAS)) & ~mm)) & 1;
  const U lsb_sub = (sig >> dn) & 1;
  const U lsb = (normal ? lsb_norm : lsb_sub) & (tiny ? U(0) : U(1));
  const U inexact = rem != 0 ? U(1) : U(0);

  U inc;
  if (MODE == kStochastic) {
    // Round away with probability floor(frac * 2^r) / 2^r, frac = rem / 2^d exactly:
    // t = floor(rem * 2^r / 2^d), away iff t + R >= 2^r for r uniform random bits R.
    // Computed in U alone (t < 2^r <= 2^32 fits even for fp32 sources): t + R >= 2^r
    // is tested as t > (2^r - 1) - R, which cannot overflow.
    if (UNIFORM && sizeof(U) == 4) {
      // t = floor(rem * 2^r / 2^d) with the precomputed shifts (rem < 2^d, so the left
      // shift stays below 2^r <= 2^32), away iff t + R >= 2^r, i.e. t > (2^r - 1) - R.
      const U t = (rem << sp.sr_lsh) >> sp.sr_rsh;
      const U R = static_cast<U>(rnd >> sp.sr_rshift) & static_cast<U>(sp.sr_rmask);
      inc = t > (static_cast<U>(sp.sr_ones) - R) ? U(1) : U(0);
    } else {
      int r = sp.rand_bits ? sp.rand_bits : (d < 32 ? d : 32);
      r = r < rcap ? r : rcap;
      // t = floor(rem * 2^r / 2^d): a right shift when d >= r, else a left shift.
      const U down = U(0) - static_cast<U>(d >= r ? 1 : 0);
      const int up_sh = r > d ? r - d : 0;
      const U t = (shr_sat<U>(rem, d - r) & down) | ((rem << up_sh) & ~down);
      const U rmask = U(0) - static_cast<U>(r > 0 ? 1 : 0);
      const U R = static_cast<U>(rnd >> (32 - (r > 0 ? r : 1))) & rmask;
      const U ones = r >= 32 ? static_cast<U>(0xFFFFFFFFu) : ((U(1) << r) - 1);
      inc = t > (ones - R) ? U(1) : U(0);
    }
  } else if (MODE == kTowardZero) {
    inc = 0;
  } else if (MODE == kUp) {
    inc = inexact & static_cast<U>(sign ^ 1u);
  } else if (MODE == kDown) {
    inc = inexact & static_cast<U>(sign);
  } else if (MODE == kOdd) {
    inc = inexact & (lsb ^ 1);
  } else {
    // Compare rem with half = 2^(d-1). The shift is clamped to [0, W-1]: at d = 0 rem
    // is 0 and half 1, and past the width half = 2^(W-1) exceeds every possible rem
    // (rem < 2^(M+1)); both give "below half" without a branch.
    const int hs = d < 1 ? 0 : (d - 1 < T::W ? d - 1 : T::W - 1);
    const U half = U(1) << hs;
    const U above = rem > half ? U(1) : U(0);
    const U tie = rem == half ? U(1) : U(0);
    inc = (MODE == kNearestEven) ? (above | (tie & lsb)) : (above | tie);
  }

  const U res = tiny ? (inc ? q_src : U(0)) : ((k + inc) << dn);
  ovf = res > max_src ? U(1) : U(0);
  return res;
}

// Rounds one value given as source bits (fp32 or fp64) into the format; returns the
// result as fp32 bits. NaN becomes the canonical quiet NaN with the input's sign.
template <int MODE, bool UNIFORM, typename U>
GS_HD uint32_t round_bits(U u, const Spec& sp, uint32_t rnd, int rcap = 32) {
  using T = Src<U>;
  const uint32_t sign = static_cast<uint32_t>(u >> (T::W - 1));
  const U a = u & T::ABS;
  // Flags are 0/1 integers, not bools, so that element loops vectorize (see above).
  const uint32_t is_nan = a > T::INF ? 1u : 0u;
  const uint32_t is_inf = a == T::INF ? 1u : 0u;
  const U max_src = T::from_f32(sp.max_bits);
  const U q_src = T::from_f32(sp.q_bits);
  U ovf = 0;
  const U res = round_magnitude<MODE, UNIFORM, U>(a, sign, sp, rnd, rcap, max_src, q_src, ovf);
  // Overflow and infinite inputs: the mode picks infinity or the largest finite value;
  // saturation always picks the latter; a format without infinity gives NaN.
  // Blends are written as mask arithmetic: GCC's vectorizer gives up on chains of
  // boolean selects here, and integer masks cost the same.
  const uint32_t to_inf = is_inf | overflow_to_inf<MODE>(sign);
  const uint32_t big = blend(sp.max_bits, sp.inf_result, to_inf);
  uint32_t mag = blend(T::to_f32(res), big, is_inf | static_cast<uint32_t>(ovf));
  mag = blend(mag, 0x7FC00000u, is_nan);
  return (sign << 31) | mag;
}

// nearest_even for formats with fp32's exponent range (bf16, tf32; Spec::fast_ne): the
// general path reduces to one add with the sticky carry. Overflow needs no test: the
// carry out of the largest finite value lands exactly on the infinity pattern, which is
// the IEEE result. Used by the GPU kernels, where the general path is compute-bound;
// identical results (the CUDA tests compare with the CPU kernels bit for bit).
GS_HD uint32_t round_ne_uniform(uint32_t u, int d) {
  const uint32_t sign = u & 0x80000000u, a = u & 0x7FFFFFFFu;
  const uint32_t mask = (1u << d) - 1u;
  const uint32_t r = (a + (mask >> 1) + ((a >> d) & 1u)) & ~mask;
  return sign | (a > 0x7F800000u ? 0x7FC00000u : r);
}

// Stochastic rounding for the same formats (Spec::fast_ne), any rand_bits: away from zero
// iff the dropped bits plus the r random bits, aligned to them, carry into the kept part
// (t + R >= 2^r in round_magnitude is that carry), so the result is one add and a mask;
// the carry out of the largest finite value is infinity, as round_bits gives. Used by the
// GPU kernels; the CUDA tests hold it against the CPU's round_bits bit for bit.
GS_HD uint32_t round_sr_uniform(uint32_t u, uint32_t rnd, const Spec& sp) {
  const uint32_t sign = u & 0x80000000u, a = u & 0x7FFFFFFFu;
  const uint32_t mask = (1u << (23 - sp.m)) - 1u;
  const uint32_t R = (rnd >> sp.sr_rshift) & sp.sr_rmask;  // the r random bits
  const uint32_t add = (R << sp.sr_rsh) >> sp.sr_lsh;        // aligned to the dropped bits
  return sign | (a > 0x7F800000u ? 0x7FC00000u : ((a + add) & ~mask));
}

// Encodes an fp32 value that is representable in the format (a result of round_bits)
// as the format's own bit pattern, right-aligned. NaN gets the canonical quiet NaN.
GS_HD uint32_t encode_bits(uint32_t r, const Spec& sp) {
  const uint32_t sign = r >> 31;
  const uint32_t a = r & 0x7FFFFFFFu;
  const int m = sp.m;
  const uint32_t top = (1u << sp.ebits) - 1u;
  uint32_t code;
  if (a > 0x7F800000u) {
    code = sp.nan_all_ones ? ((top << m) | ((1u << m) - 1u))
                           : ((top << m) | (m > 0 ? (1u << (m - 1)) : 0u));
  } else if (a == 0x7F800000u) {
    code = top << m;
  } else {
    const int E = static_cast<int>(a >> 23);
    const int e = (E > 1 ? E : 1) - 127;
    const uint32_t mant = a & 0x7FFFFFu;
    if (a == 0) {
      code = 0;
    } else if (E != 0 && e >= sp.emin) {
      code = (static_cast<uint32_t>(e + sp.bias) << m) | (mant >> (23 - m));
    } else {
      const uint32_t sig = E ? (mant | 0x800000u) : mant;
      code = sig >> (23 - m + sp.emin - e);
    }
  }
  return code | (sign << (sp.ebits + m));
}

// Spacing of the format at x: 2^(max(e, emin) - m) for |x| in [2^e, 2^(e+1)) (the
// docs/metrics.md definition), 2^(emin - msub) at zero and below 2^emin, inf at inf.
GS_HD uint32_t ulp_bits(uint32_t u, const Spec& sp) {
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return 0x7FC00000u;
  if (a == 0x7F800000u) return 0x7F800000u;
  const int E = static_cast<int>(a >> 23);
  int e = (E > 1 ? E : 1) - 127;
  const int es = subnormal_exp((a & 0x7FFFFFu) | 1u);  // fp32 subnormal: floor(log2 |x|)
  e = (E == 0 && a != 0) ? es : e;
  const int qe = (a != 0 && e >= sp.emin) ? e - sp.m : sp.emin - sp.msub;
  return pow2_bits(qe);
}

// Exact a + b (doubles) rounded to odd into fp64: the double nearest the exact sum with
// an odd last bit whenever the sum is inexact. Rounding that double to any format with at
// most 53 - 2 bits of precision gives the correct rounding of the exact sum in every
// mode (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums", 2008), and a
// stochastic decision on at most (52 - m - 1) random bits sees the exact fraction. A NaN
// sum is the canonical +qNaN (which NaN hardware returns is its own choice).
GS_HD uint64_t add_to_odd(double a, double b) {
  const double s = a + b;
  // TwoSum (Knuth): s + err == a + b exactly. No multiplications, so no contraction.
  const double bb = s - a;
  const double err = (a - (s - bb)) + (b - bb);
  const uint64_t bits = f64_bits(s);
  // Round to odd, branch-free so element loops vectorize: when inexact, truncate toward
  // zero (s was rounded away from zero iff err's sign differs from s's; the magnitude
  // then steps down by one) and set the last bit.
  const uint64_t finite = (bits & 0x7FF0000000000000ull) != 0x7FF0000000000000ull ? 1u : 0u;
  const uint64_t inexact = finite & (err != 0.0 ? 1u : 0u);
  const uint64_t away = inexact & ((f64_bits(err) ^ bits) >> 63);
  const uint64_t odd = (bits - away) | inexact;
  return s == s ? odd : 0x7FF8000000000000ull;
}

// The exact w + delta of two floats, rounded to odd into fp64.
GS_HD uint64_t sum_to_odd(float w, float dl) { return add_to_odd(w, dl); }

// Random bits cap for the exact-sum path: keep the decision boundary on an even double.
GS_HD int exact_sum_rcap(const Spec& sp) { return 51 - sp.m < 32 ? 51 - sp.m : 32; }

}  // namespace gatesim
