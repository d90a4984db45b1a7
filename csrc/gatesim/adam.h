// Adam's moment updates and step direction as torch's own ops compute them, for the fused
// Adam step of every backend (torch.ops.gatesim.adam_step). Header-only, host/device.
//
// torch's kernels evaluate lerp_, addcmul_ and a division by a scalar in fp32, but which
// of several equivalent-looking formulas a given build runs is the compiler's choice
// (whether `a + w * b` was contracted into an fma) and torch's (a scalar divisor's
// reciprocal). The formulas are numbered by a "variant"; gatesim.optim.adam_variant finds
// the one that reproduces torch's bits on a device by trying them all on a probe.
//
// Everything below is written with plain fp32 operators and an explicit fma: the project
// compiles without contraction (-ffp-contract=off, nvcc --fmad=false), and fp32 division
// and sqrt are IEEE on both backends, so an expression means the same roundings on both.
#pragma once
#include <cstdint>

#include "gatesim/platform.h"
#include "gatesim/rounding.h"

namespace gatesim {

// Variant bits.
constexpr int kAdamLerpFma = 1;      // lerp contracted into an fma
constexpr int kAdamAddcmulShift = 1; // bits 1-2: addcmul's form, see adam_sq
constexpr int kAdamDivShift = 3;     // bits 3-4: 0 true division by sqrt(bias_correction2),
                                     // 1 product with the fp32 reciprocal of its fp32 value,
                                     // 2 product with the fp32 rounding of the fp64 reciprocal
constexpr int kAdamTorchSqrt = 32;   // CPU: sqrt by torch's own op (MKL's, not correctly
                                     // rounded); otherwise the IEEE sqrt
constexpr int kAdamVariants = 64;

struct AdamCoef {
  float w1, w1c;       // lerp weight 1 - beta1, and 1 - w1 (computed in fp32, as torch does)
  float beta2, a2;     // exp_avg_sq.mul_(beta2).addcmul_(g, g, value=a2)
  float bc2;           // sqrt(bias_correction2)
  float inv32, inv64;  // its reciprocal (see kAdamDivShift)
  float eps, neg_step; // eps, -step_size
  int variant;
  int state_round;     // round the moments to the state format (nearest even) after each op
  Spec sps;            // the state format
};

// From the op's coef = [1 - beta1, beta2, 1 - beta2, sqrt(bias_correction2), eps,
// -step_size]: each rounded to fp32 as torch rounds a Python scalar for an fp32 tensor.
inline AdamCoef make_adam_coef(const double* coef, int variant, bool state_round,
                               const Spec& sps) {
  AdamCoef c;
  c.w1 = static_cast<float>(coef[0]);
  c.w1c = 1.0f - c.w1;
  c.beta2 = static_cast<float>(coef[1]);
  c.a2 = static_cast<float>(coef[2]);
  c.bc2 = static_cast<float>(coef[3]);
  c.inv32 = 1.0f / c.bc2;
  c.inv64 = static_cast<float>(1.0 / coef[3]);
  c.eps = static_cast<float>(coef[4]);
  c.neg_step = static_cast<float>(coef[5]);
  c.variant = variant;
  c.state_round = state_round ? 1 : 0;
  c.sps = sps;
  return c;
}

GS_HD float fma_raw(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

// exp_avg.lerp_(grad, w): self + w * (end - self) for |w| < 0.5 (SMALL), else
// end - (end - self) * (1 - w).
template <bool FMA, bool SMALL>
GS_HD float adam_lerp(float m, float g, float w, float wc) {
  const float diff = g - m;
  if (SMALL) return FMA ? fma_raw(w, diff, m) : m + w * diff;
  return FMA ? fma_raw(-diff, wc, g) : g - diff * wc;
}

// exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=a2), in one of torch's forms:
// 0 a + alpha * (b * c) contracted, 1 a + alpha * b * c contracted, 2 and 3 the same
// uncontracted.
template <int FORM>
GS_HD float adam_sq(float v, float g, float beta2, float a2) {
  const float v1 = v * beta2;
  if (FORM == 0) return fma_raw(a2, g * g, v1);
  if (FORM == 1) return fma_raw(a2 * g, g, v1);
  if (FORM == 2) return v1 + a2 * (g * g);
  return v1 + (a2 * g) * g;
}

GS_HD float adam_round_state(float x, const Spec& sp) {
  const uint32_t b = f32_bits(x);
  return bits_f32(sp.uniform ? round_bits<kNearestEven, true, uint32_t>(b, sp, 0u)
                             : round_bits<kNearestEven, false, uint32_t>(b, sp, 0u));
}

// The moments of one element with the variant read at run time (GPU threads; the CPU
// loops instantiate the templates above directly, so that they vectorize).
GS_HD void adam_moments(const AdamCoef& c, float g, float& m, float& v) {
  const bool small = (c.w1 < 0.0f ? -c.w1 : c.w1) < 0.5f;
  const bool fma = (c.variant & kAdamLerpFma) != 0;
  m = small ? (fma ? adam_lerp<true, true>(m, g, c.w1, c.w1c) : adam_lerp<false, true>(m, g, c.w1, c.w1c))
            : (fma ? adam_lerp<true, false>(m, g, c.w1, c.w1c) : adam_lerp<false, false>(m, g, c.w1, c.w1c));
  switch ((c.variant >> kAdamAddcmulShift) & 3) {
    case 0: v = adam_sq<0>(v, g, c.beta2, c.a2); break;
    case 1: v = adam_sq<1>(v, g, c.beta2, c.a2); break;
    case 2: v = adam_sq<2>(v, g, c.beta2, c.a2); break;
    default: v = adam_sq<3>(v, g, c.beta2, c.a2); break;
  }
  if (c.state_round) {
    m = adam_round_state(m, c.sps);
    v = adam_round_state(v, c.sps);
  }
}

// The step direction from sqrt(exp_avg_sq), as gatesim.optim._direction:
// (exp_avg * -step_size) / (root / bc2 + eps).
template <int DIV>
GS_HD float adam_direction(float m, float root, const AdamCoef& c) {
  const float den = (DIV == 0 ? root / c.bc2 : root * (DIV == 1 ? c.inv32 : c.inv64)) + c.eps;
  return (m * c.neg_step) / den;
}

GS_HD float adam_direction_any(float m, float root, const AdamCoef& c) {
  switch ((c.variant >> kAdamDivShift) & 3) {
    case 0: return adam_direction<0>(m, root, c);
    case 1: return adam_direction<1>(m, root, c);
    default: return adam_direction<2>(m, root, c);
  }
}

}  // namespace gatesim
