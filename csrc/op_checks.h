// Argument checks shared by the CPU and CUDA op implementations.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include "gatesim/rounding.h"

namespace gatesim {

inline void check_float_input(const at::Tensor& x, const char* name, c10::DeviceType dev) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().type() == dev, name, " must be on ", c10::DeviceTypeName(dev),
                    " for this kernel, got ", x.device());
  TORCH_CHECK_VALUE(x.is_contiguous(), name, " must be contiguous");
}

inline int enc_for(at::ScalarType t, const Spec& sp) {
  switch (t) {
    case at::kFloat: return kEncF32;
    case at::kBFloat16:
      TORCH_CHECK_TYPE(sp.ebits == 8 && sp.m == 7 && sp.uniform, "bfloat16 output needs BF16");
      return kEncHi16;
    case at::kHalf:
      TORCH_CHECK_TYPE(sp.ebits == 5 && sp.m == 10 && sp.bias == 15, "float16 output needs FP16");
      return kEnc16;
    case at::kFloat8_e4m3fn:
      TORCH_CHECK_TYPE(sp.ebits == 4 && sp.m == 3 && sp.bias == 7 && sp.nan_all_ones,
                       "float8_e4m3fn output needs E4M3FN");
      return kEnc8;
    case at::kFloat8_e5m2:
      TORCH_CHECK_TYPE(sp.ebits == 5 && sp.m == 2 && sp.bias == 15 && !sp.nan_all_ones,
                       "float8_e5m2 output needs E5M2");
      return kEnc8;
    default:
      TORCH_CHECK_TYPE(false, "unsupported output dtype ", t);
  }
  return kEncF32;
}

inline void check_mode(int64_t mode) {
  TORCH_CHECK_VALUE(mode >= 0 && mode < kNumModes, "mode must be in 0..", kNumModes - 1,
                    ", got ", mode);
}

inline void check_stream(int64_t seed, int64_t offset, int64_t n) {
  TORCH_CHECK_VALUE(seed >= 0, "seed must be non-negative, got ", seed);
  TORCH_CHECK_VALUE(offset >= 0, "offset must be non-negative, got ", offset);
  TORCH_CHECK_VALUE(offset <= (int64_t{1} << 62) - n, "offset + numel exceeds 2**62");
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), ", param on ",
                    ref.device());
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " has shape ", t.sizes(), ", param has ",
                    ref.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace gatesim
