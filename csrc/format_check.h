// Turns the op-level `int[] fmt` into a Spec, re-checking what Python already
// validated so a direct torch.ops call cannot reach a kernel with a bad format.
#pragma once
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "gatesim/rounding.h"

namespace gatesim {

inline Spec spec_from_list(c10::IntArrayRef f) {
  TORCH_CHECK_VALUE(f.size() == 8, "fmt must have 8 entries, got ", f.size());
  const int64_t ebits = f[0], m = f[1], bias = f[2], rand_bits = f[7];
  TORCH_CHECK_VALUE(ebits >= 1 && ebits <= 8, "ebits must be in 1..8, got ", ebits);
  TORCH_CHECK_VALUE(m >= 0 && m <= 23, "mbits must be in 0..23, got ", m);
  TORCH_CHECK_VALUE(rand_bits >= 0 && rand_bits <= 32, "rand_bits must be in 0..32, got ",
                    rand_bits);
  const bool subnormals = f[3] != 0, has_inf = f[4] != 0, fn = f[5] != 0, sat = f[6] != 0;
  TORCH_CHECK_VALUE(!(fn && has_inf), "a format with nan='fn' has no infinities");
  TORCH_CHECK_VALUE(fn || m >= 1, "nan='ieee' needs mbits >= 1 to encode NaN");
  const int64_t top = (int64_t{1} << ebits) - 1;
  const int64_t emax = (fn ? (m > 0 ? top : top - 1) : top - 1) - bias;
  const int64_t emin = 1 - bias;
  TORCH_CHECK_VALUE(emax >= emin, "format has no normal binade (ebits/nan/bias)");
  TORCH_CHECK_VALUE(emax <= 127, "bias too small: largest exponent ", emax, " exceeds fp32's 127");
  TORCH_CHECK_VALUE(emin >= -126, "bias too large: smallest normal 2^", emin,
                    " is below fp32's 2^-126");
  return make_spec(static_cast<int>(ebits), static_cast<int>(m), static_cast<int>(bias),
                   subnormals, has_inf, fn, sat, static_cast<int>(rand_bits));
}

}  // namespace gatesim
