// One optimizer-step update of one element in emulated precision, and the statistics
// of what the rounding absorbed. Header-only, host/device: every backend uses it.
//
// Three storage policies (see gatesim/update.py for the user-level description):
//   storage-only  p <- R(p * decay + alpha * delta)
//   fp32 master   m <- fl32(fl32(m * decay) + alpha * delta)  (fma: one rounding);  p <- R(m)
//   Kahan         p, c in the storage format, c the compensation buffer (torch-optimi)
// R rounds to the storage format in the chosen mode. Sums are either exact (one correct
// rounding of the exact result, via TwoSum and round-to-odd in fp64) or "fp32" (computed
// in fp32 first, as PyTorch does for low-precision tensors, then rounded).
#pragma once
#include <cstdint>

#include "gatesim/philox.h"
#include "gatesim/platform.h"
#include "gatesim/rounding.h"

namespace gatesim {

enum SumMode : int32_t { kSumExact = 0, kSumFp32 = 1 };
enum Path : int32_t { kStorage = 0, kMaster = 1, kKahan = 2 };

// Histogram of log2(|u| / ulp(p)) for non-zero finite updates u: bin 0 is < 2^-24,
// bin 1 + j is [2^(j-24), 2^(j-23)) for j = 0..31, bin 33 is >= 2^8.
constexpr int kHistLo = -24;
constexpr int kHistBins = 34;

// Layout of the integer statistics vector (the op's first output).
enum Stat : int {
  kStatN = 0,
  kStatChanged,          // stored bits differ (+0 == -0; NaN never equal)
  kStatAbsorbed,         // u != 0 but stored bits unchanged
  kStatZero,             // u == 0
  kStatNonfiniteDelta,   // delta is inf or NaN
  kStatNonfiniteParam,   // stored value before the step is inf or NaN
  kStatNonfiniteResult,  // stored value after the step is inf or NaN
  kStatSumDiffers,       // storage-only: the other sum mode would store other bits
  kStatHist0,
  kNumStats = kStatHist0 + kHistBins,
};

// NaN results of arithmetic are made canonical (+qNaN) before anything else sees them:
// which NaN an operation returns is the hardware's choice (x86 keeps an operand's payload
// and sign, CUDA returns 0x7FFFFFFF), and results must not depend on the device.
GS_HD float canon32(float x) { return x == x ? x : bits_f32(0x7FC00000u); }
GS_HD double canon64(double x) { return x == x ? x : bits_f64(0x7FF8000000000000ull); }

// fp32 fma (one rounding), NaN made canonical.
GS_HD float fma32(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return canon32(__fmaf_rn(a, b, c));
#else
  return canon32(__builtin_fmaf(a, b, c));  // correctly rounded everywhere (hardware or libm)
#endif
}

// fp32 product and sums with canonical NaN.
GS_HD float mul32(float a, float b) { return canon32(a * b); }
GS_HD float add32(float a, float b) { return canon32(a + b); }
GS_HD float sub32(float a, float b) { return canon32(a - b); }

// Rounds fp32 bits with the mode chosen at run time (for the less common policies).
template <bool UNIFORM, typename U>
GS_HD uint32_t round_any(U u, const Spec& sp, int mode, uint32_t rnd, int rcap = 32) {
  switch (mode) {
    case kNearestEven: return round_bits<kNearestEven, UNIFORM, U>(u, sp, rnd, rcap);
    case kNearestAway: return round_bits<kNearestAway, UNIFORM, U>(u, sp, rnd, rcap);
    case kTowardZero: return round_bits<kTowardZero, UNIFORM, U>(u, sp, rnd, rcap);
    case kUp: return round_bits<kUp, UNIFORM, U>(u, sp, rnd, rcap);
    case kDown: return round_bits<kDown, UNIFORM, U>(u, sp, rnd, rcap);
    case kOdd: return round_bits<kOdd, UNIFORM, U>(u, sp, rnd, rcap);
    default: return round_bits<kStochastic, UNIFORM, U>(u, sp, rnd, rcap);
  }
}

// MODE >= 0 is fixed at compile time (fast paths); MODE < 0 reads `mode`.
template <int MODE, bool UNIFORM, typename U>
GS_HD uint32_t round_m(U u, const Spec& sp, int mode, uint32_t rnd, int rcap = 32) {
  if (MODE >= 0) return round_bits<(MODE >= 0 ? MODE : 0), UNIFORM, U>(u, sp, rnd, rcap);
  return round_any<UNIFORM, U>(u, sp, mode, rnd, rcap);
}

// Decodes a storage code of the format (right-aligned) into fp32 bits.
GS_HD uint32_t decode_bits(uint32_t code, const Spec& sp) {
  const int m = sp.m;
  const uint32_t top = (1u << sp.ebits) - 1u;
  const uint32_t sign = (code >> (sp.ebits + m)) & 1u;
  const uint32_t E = (code >> m) & top;
  const uint32_t M = code & ((1u << m) - 1u);
  uint32_t mag;
  if (!sp.nan_all_ones && E == top) {
    mag = M == 0 ? 0x7F800000u : 0x7FC00000u;
  } else if (sp.nan_all_ones && E == top && M == (1u << m) - 1u) {
    mag = 0x7FC00000u;
  } else if (E == 0) {
    mag = f32_bits(static_cast<float>(M) * bits_f32(pow2_bits(sp.emin - m)));  // exact
  } else {
    mag = (static_cast<uint32_t>(static_cast<int>(E) - sp.bias + 127) << 23) | (M << (23 - m));
  }
  return mag | (sign << 31);
}

// Reads element i of a parameter stored with encoding ENC as fp32 bits, and writes it
// back from fp32 bits (which hold a value of the format).
template <int ENC>
GS_HD uint32_t load_code(const void* base, int64_t i, const Spec& sp) {
  if (ENC == kEncF32) return static_cast<const uint32_t*>(base)[i];
  if (ENC == kEncHi16) return static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16;
  if (ENC == kEnc16) return decode_bits(static_cast<const uint16_t*>(base)[i], sp);
  return decode_bits(static_cast<const uint8_t*>(base)[i], sp);
}

template <int ENC>
GS_HD void store_code(void* base, int64_t i, uint32_t r, const Spec& sp) {
  if (ENC == kEncF32) static_cast<uint32_t*>(base)[i] = r;
  else if (ENC == kEncHi16) static_cast<uint16_t*>(base)[i] = static_cast<uint16_t>(r >> 16);
  else if (ENC == kEnc16) static_cast<uint16_t*>(base)[i] = static_cast<uint16_t>(encode_bits(r, sp));
  else static_cast<uint8_t*>(base)[i] = static_cast<uint8_t>(encode_bits(r, sp));
}

// Exponent q of ulp(x) = 2^q (x finite), per ulp_bits; the format enters only through
// emin, m and msub (plain ints keep vectorized callers simple).
GS_HD int ulp_exp_of(uint32_t u, int emin, int m, int msub) {
  const uint32_t a = u & 0x7FFFFFFFu;
  const int E = static_cast<int>(a >> 23);
  const int en = (E > 1 ? E : 1) - 127;
  // Computed unconditionally: a conversion inside a branch would block if-conversion
  // (GCC treats it as a possible trap). a | 1 keeps it defined at a = 0 (unused then).
  const int es = subnormal_exp((a & 0x7FFFFFu) | 1u);
  const int e = E == 0 ? es : en;
  const int normal = (a != 0 ? 1 : 0) & (e >= emin ? 1 : 0);
  return normal ? e - m : emin - msub;
}

GS_HD int ulp_exp(uint32_t u, const Spec& sp) { return ulp_exp_of(u, sp.emin, sp.m, sp.msub); }

// Buffers of one apply_update call (param and comp encoded per the storage format).
struct UpdatePtrs {
  void* param;
  const float* delta;
  float* master;  // master path only
  void* comp;     // Kahan path only
};

struct UpdateArgs {
  Spec sp;        // storage format, with the mode's rand_bits and saturation
  Spec spc;       // compensation buffer: same format, never saturating, nearest_even
  int mode;       // rounding mode of the stored parameter
  int sum_mode;   // kSumExact / kSumFp32
  float alpha;    // update = alpha * delta
  float decay;    // multiplicative decay applied first (1 = none)
  uint64_t seed;  // Philox key
  uint64_t offset;
  uint64_t step;  // random streams 2 * step (decay rounding) and 2 * step + 1 (update)
};

struct UpdateResult {
  uint32_t p;  // new stored value, fp32 bits
  float m;     // new master (master path)
  uint32_t c;  // new compensation, fp32 bits (Kahan path)
  bool other_differs;
};

// Storage-only policy. `other` requests the other sum mode's result for comparison.
template <int MODE, bool UNIFORM>
GS_HD uint32_t storage_step(float p, float d, const UpdateArgs& a, int sum_mode, uint32_t r0,
                            uint32_t r1) {
  if (sum_mode == kSumExact) {
    // One correct rounding of the exact p * decay + alpha * delta (both products exact).
    const uint64_t s = add_to_odd(canon64(static_cast<double>(p) * a.decay),
                                  canon64(static_cast<double>(a.alpha) * d));
    return round_m<MODE, false, uint64_t>(s, a.sp, a.mode, r1, exact_sum_rcap(a.sp));
  }
  // PyTorch on low-precision tensors: p.mul_(decay); p.add_(delta, alpha=alpha), each
  // computed in fp32 (add with alpha is an fma) and rounded to the storage format.
  const float p1 = bits_f32(round_m<MODE, UNIFORM, uint32_t>(f32_bits(mul32(p, a.decay)), a.sp, a.mode, r0));
  return round_m<MODE, UNIFORM, uint32_t>(f32_bits(fma32(a.alpha, d, p1)), a.sp, a.mode, r1);
}

// storage_step for fp32 storage (Spec of FP32 itself), nearest-even, both sum modes: the
// exact sum rounded to odd into fp64 then converted by the hardware (correct
// nearest-even rounding into fp32, subnormals and overflow included, since fp64 keeps
// 53 >= 24 + 2 bits); branch-free, so the optimizers' fp32 policy vectorizes.
GS_HD uint32_t storage_exact_fp32_ne(float p, float d, float decay, float alpha) {
  const uint64_t s = add_to_odd(canon64(static_cast<double>(p) * decay),
                                canon64(static_cast<double>(alpha) * d));
  return f32_bits(canon32(static_cast<float>(bits_f64(s))));
}
// storage_exact_fp32_ne for alpha == 1: the fma rounds the exact p * decay + d once, as
// the round-to-odd detour does (same bits, canonical NaN, IEEE signed zeros).
GS_HD uint32_t storage_exact_fp32_ne_unit(float p, float d, float decay) {
  return f32_bits(fma32(p, decay, d));
}

// An fp64 value rounded to odd into fp32 (NaN in: the canonical NaN). Followed by a
// nearest-even rounding to a format of at most 21 mantissa bits inside fp32's range, it
// gives that rounding of x itself. Branch-free.
GS_HD uint32_t odd32(double x) {
  const float f = static_cast<float>(x);
  const double back = static_cast<double>(f);
  const uint32_t inexact = (back != x ? 1u : 0u) & (x == x ? 1u : 0u);
  const uint32_t away = inexact & ((back < 0.0 ? -back : back) > (x < 0.0 ? -x : x) ? 1u : 0u);
  return (f32_bits(f) - away) | inexact;
}

// The exact p * decay + alpha * d rounded to odd into fp32 (for rounding on to a uniform
// format with at most 21 mantissa bits: 24 >= m + 2 bits keep that second rounding
// correct). Round-to-odd in fp64 first, then the hardware conversion, stepped back toward
// zero when it rounded away, with the last bit set when inexact. Branch-free.
GS_HD uint32_t exact_sum_odd32(float p, float d, float decay, float alpha) {
  return odd32(bits_f64(add_to_odd(canon64(static_cast<double>(p) * decay),
                                   canon64(static_cast<double>(alpha) * d))));
}

// exact_sum_odd32 for alpha == 1 and no decay: p + d by TwoSum in fp32 (16 lanes where
// fp64 gives 8; the error term is exact whenever the sum is finite). Stepped back toward
// zero when the sum rounded away, last bit set when inexact. A sum of finite inputs past
// fp32's range gives +-FLT_MAX, odd, as the fp64 detour does; inf and NaN inputs give
// their sum (NaN canonical).
// fp32 bits with a NaN made canonical, by integer select (see sum_odd32_unit).
GS_HD uint32_t canon_bits32(uint32_t b) {
  const uint32_t nan = (b & 0x7FFFFFFFu) > 0x7F800000u ? 1u : 0u;
  return b ^ ((b ^ 0x7FC00000u) & (0u - nan));
}

GS_HD uint32_t sum_odd32_unit(float p, float d) {
  // Integer selects throughout (NaN made canonical at the end, not by canon32): with a
  // float select in it, GCC 12 does not vectorize the callers' loops.
  const float s = p + d;
  const float pv = s - d;  // Knuth's TwoSum: the parts of p and d that s holds
  const float dv = s - pv;
  const float e = (d - dv) + (p - pv);
  const uint32_t sb = f32_bits(s);
  const uint32_t finite_in = ((f32_bits(p) & 0x7F800000u) != 0x7F800000u ? 1u : 0u) &
                             ((f32_bits(d) & 0x7F800000u) != 0x7F800000u ? 1u : 0u);
  const uint32_t overflow = finite_in & ((sb & 0x7F800000u) == 0x7F800000u ? 1u : 0u);
  const uint32_t inexact = (e != 0.0f ? 1u : 0u) & (1u - overflow) & finite_in;
  const uint32_t away = inexact & ((f32_bits(e) ^ sb) >> 31);
  const uint32_t r = (sb - away) | inexact;
  const uint32_t big = (sb & 0x80000000u) | 0x7F7FFFFFu;
  const uint32_t r2 = r ^ ((r ^ big) & (0u - overflow));
  // s is NaN exactly when r2 is (r2 = sb unless the inputs are finite)
  return canon_bits32(r2);
}

GS_HD uint32_t storage_fp32_fp32_ne(float p, float d, float decay, float alpha) {
  return f32_bits(fma32(alpha, d, mul32(p, decay)));
}

// kahan_step's sum mode "fp32": torch-optimi's Kahan summation with every op in the
// storage dtype:  c.add_(u); t = p; p.add_(c); c.add_(t.sub_(p))
template <int MODE, bool UNIFORM>
GS_HD void kahan_step_fp32sum(float p, float c, float d, const UpdateArgs& a, uint32_t r0,
                              uint32_t r1, uint32_t& p_out, uint32_t& c_out) {
  const Spec& spc = a.spc;
  const float p1 = bits_f32(round_m<MODE, UNIFORM, uint32_t>(f32_bits(mul32(p, a.decay)), a.sp, a.mode, r0));
  const float c1 = bits_f32(round_bits<kNearestEven, UNIFORM, uint32_t>(
      f32_bits(fma32(a.alpha, d, c)), spc, 0u));
  const float p2 = bits_f32(round_m<MODE, UNIFORM, uint32_t>(f32_bits(add32(p1, c1)), a.sp, a.mode, r1));
  const float t = bits_f32(round_bits<kNearestEven, UNIFORM, uint32_t>(f32_bits(sub32(p1, p2)), spc, 0u));
  p_out = f32_bits(p2);
  c_out = round_bits<kNearestEven, UNIFORM, uint32_t>(f32_bits(add32(c1, t)), spc, 0u);
}

// kahan_step's exact sums with nearest-even, for param and compensation formats of at
// most 21 mantissa bits inside fp32's range: each exact value is rounded to odd into fp32
// first (odd32), then to the format, which gives kahan_step's bits without its 64-bit
// rounding (branch-free 32-bit work: the loop vectorizes).
// SIMPLER: 0 in general; 1 without decay (p1 rounds the fp32 value p itself, and p1 + c1,
// a sum of two fp32 values, goes through sum_odd32_unit); 2 also with alpha == 1 (so does
// c + d). The same bits in every case; only the work differs.
template <bool UNIFORM, int SIMPLER = 0>
GS_HD void kahan_step_exact_ne_narrow(float p, float c, float d, const UpdateArgs& a,
                                      uint32_t& p_out, uint32_t& c_out) {
  const Spec& spc = a.spc;
  const float p1 = bits_f32(round_bits<kNearestEven, UNIFORM, uint32_t>(
      SIMPLER >= 1 ? canon_bits32(f32_bits(p)) : odd32(canon64(static_cast<double>(p) * a.decay)),
      a.sp, 0u));
  const float c1 = bits_f32(round_bits<kNearestEven, UNIFORM, uint32_t>(
      SIMPLER >= 2 ? sum_odd32_unit(c, d)
                   : odd32(bits_f64(add_to_odd(c, canon64(static_cast<double>(a.alpha) * d)))),
      spc, 0u));
  const float p2 = bits_f32(round_bits<kNearestEven, UNIFORM, uint32_t>(
      SIMPLER >= 1 ? sum_odd32_unit(p1, c1) : odd32(bits_f64(add_to_odd(p1, c1))), a.sp, 0u));
  const double lost = canon64(static_cast<double>(p1) - static_cast<double>(p2));  // as kahan_step
  p_out = f32_bits(p2);
  c_out = round_bits<kNearestEven, UNIFORM, uint32_t>(odd32(bits_f64(add_to_odd(c1, lost))), spc, 0u);
}

template <int MODE, bool UNIFORM>
GS_HD void kahan_step(float p, float c, float d, const UpdateArgs& a, uint32_t r0, uint32_t r1,
                      uint32_t& p_out, uint32_t& c_out) {
  const Spec& spc = a.spc;
  if (a.sum_mode == kSumExact) {
    const float p1 = bits_f32(round_m<MODE, false, uint64_t>(
        f64_bits(canon64(static_cast<double>(p) * a.decay)), a.sp, a.mode, r0, exact_sum_rcap(a.sp)));
    const float c1 = bits_f32(round_bits<kNearestEven, false, uint64_t>(
        add_to_odd(c, canon64(static_cast<double>(a.alpha) * d)), spc, 0u));
    const float p2 = bits_f32(round_m<MODE, false, uint64_t>(add_to_odd(p1, c1), a.sp, a.mode,
                                                             r1, exact_sum_rcap(a.sp)));
    // Exact while p1's and p2's lowest bits lie within 53 bits of the larger one (always
    // when |p1| >= |c1|); a compensation 2^29 times the weight or more can make it an fp64
    // rounding (the numba twin does the same, so the bits still agree).
    const double lost = canon64(static_cast<double>(p1) - static_cast<double>(p2));
    p_out = f32_bits(p2);
    c_out = round_bits<kNearestEven, false, uint64_t>(add_to_odd(c1, lost), spc, 0u);
  } else {
    kahan_step_fp32sum<MODE, UNIFORM>(p, c, d, a, r0, r1, p_out, c_out);
  }
}

// The absorbed mass is summed in one fixed order on every backend: within each block
// of kUpdateBlock (4096) elements, zero-padded, and then over the blocks (zero-padded to
// a power of two), always by the same pairwise tree: for half = n/2, n/4, ..., 1:
// a[k] += a[k + half] for k < half. Vector units and GPU thread blocks evaluate a level
// at once, and the result is bit-identical everywhere. n must be a power of two.
GS_HD double tree_sum(double* a, int64_t n) {
  for (int64_t half = n >> 1; half >= 1; half >>= 1) {
    for (int64_t k = 0; k < half; ++k) a[k] += a[k + half];
  }
  return n > 0 ? a[0] : 0.0;
}

// Per-element contribution to the statistics, packed: bit 0 changed, 1 absorbed, 2 zero
// update, 3 non-finite delta, 4 non-finite param before, 5 non-finite after, 6 the other
// sum mode differs. Written with 0/1 integers (no bools) so element loops vectorize.
GS_HD uint32_t nonfinite32(uint32_t b) { return (b & 0x7F800000u) == 0x7F800000u ? 1u : 0u; }

GS_HD uint32_t element_flags(uint32_t p_old, uint32_t p_new, uint32_t d_bits, double u,
                             uint32_t differs) {
  const uint32_t same = (p_old == p_new ? 1u : 0u) | (((p_old | p_new) & 0x7FFFFFFFu) == 0 ? 1u : 0u);
  const uint32_t old_nan = (p_old & 0x7FFFFFFFu) > 0x7F800000u ? 1u : 0u;
  const uint32_t changed = (same ^ 1u) | old_nan;
  const uint32_t zero = u == 0.0 ? 1u : 0u;  // NaN counts as non-zero
  const uint32_t absorbed = (zero ^ 1u) & (changed ^ 1u);
  return changed | (absorbed << 1) | (zero << 2) | (nonfinite32(d_bits) << 3) |
         (nonfinite32(p_old) << 4) | (nonfinite32(p_new) << 5) | (differs << 6);
}

// Histogram bin of a non-zero finite update u on stored value p_old; -1 for none.
GS_HD int element_bin(uint32_t p_old, double u, int emin, int m, int msub) {
  const uint64_t ub = f64_bits(u);
  const int ue = static_cast<int>((ub >> 52) & 0x7FFu);
  const int none = ((ub << 1) == 0 ? 1 : 0) | (ue == 0x7FF ? 1 : 0) |
                   static_cast<int>(nonfinite32(p_old));
  int k = (ue - 1023) - ulp_exp_of(p_old, emin, m, msub) - kHistLo + 1;  // 0: below 2^kHistLo
  k = k < 0 ? 0 : (k > kHistBins - 1 ? kHistBins - 1 : k);
  return none ? -1 : k;
}

// element_bin for an fp32 update (u = delta exactly: alpha = 1, no decay).
GS_HD int element_bin32(uint32_t p_old, uint32_t u_bits, int emin, int m, int msub) {
  const uint32_t a = u_bits & 0x7FFFFFFFu;
  const int E = static_cast<int>(a >> 23);
  const int es = subnormal_exp((a & 0x7FFFFFu) | 1u);
  const int ue = E == 0 ? es : E - 127;
  const int none = (a == 0 ? 1 : 0) | (E == 0xFF ? 1 : 0) | static_cast<int>(nonfinite32(p_old));
  int k = ue - ulp_exp_of(p_old, emin, m, msub) - kHistLo + 1;
  k = k < 0 ? 0 : (k > kHistBins - 1 ? kHistBins - 1 : k);
  return none ? -1 : k;
}

// element_bin32 for uniform formats (fp32's exponent range with subnormals: emin = -126,
// msub = m). There ulp(p) = 2^(max(Ep, 1) - 127 - m) for every finite p, zero and
// subnormals included, so the bin needs only the two biased exponents: fewer vector
// operations in the replay loop, which is compute-bound once statistics are on.
GS_HD int element_bin32_uniform(uint32_t p_old, uint32_t u_bits, int m) {
  const uint32_t a = u_bits & 0x7FFFFFFFu;
  const int E = static_cast<int>(a >> 23);
  const int Ep = static_cast<int>((p_old >> 23) & 0xFFu);
  // A subnormal update: its exact biased exponent (may be <= 0), via the exact int->float
  // conversion (see subnormal_exp).
  const int es = static_cast<int>(f32_bits(static_cast<float>(static_cast<int32_t>(a | 1u))) >> 23) - 149;
  const int Eu = E == 0 ? es : E;
  const int none = (a == 0 ? 1 : 0) | (E == 0xFF ? 1 : 0) | (Ep == 0xFF ? 1 : 0);
  int k = Eu - (Ep > 1 ? Ep : 1) + m - kHistLo + 1;
  k = k < 0 ? 0 : (k > kHistBins - 1 ? kHistBins - 1 : k);
  return none ? -1 : k;
}

}  // namespace gatesim
