// Argument checks shared by the CPU and CUDA op implementations.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "format_check.h"
#include "gatesim/adam.h"
#include "gatesim/rounding.h"
#include "gatesim/update.h"

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

// apply_update writes param (and master or the compensation) while it reads delta:
// buffers that share memory would read values the same call has already written.
inline void check_no_overlap(const at::Tensor& a, const char* an, const at::Tensor& b,
                             const char* bn) {
  TORCH_CHECK_VALUE(at::get_overlap_status(a, b) == at::MemOverlapStatus::No, an, " and ", bn,
                    " share memory; apply_update needs separate buffers");
}

// Everything an apply_update kernel needs, from the op's arguments, checked.
struct UpdateCall {
  UpdatePtrs t;
  UpdateArgs a;
  int path;
  int enc;
  int64_t n;
};

inline UpdateCall prepare_update(at::Tensor& param, const at::Tensor& delta,
                                 const std::optional<at::Tensor>& master,
                                 const std::optional<at::Tensor>& comp, c10::IntArrayRef fmt,
                                 int64_t mode, int64_t sum_mode, double alpha, double decay,
                                 int64_t seed, int64_t offset, int64_t step, c10::DeviceType dev) {
  TORCH_CHECK_VALUE(param.device().type() == dev, "param must be on ", c10::DeviceTypeName(dev),
                    " for this kernel, got ", param.device());
  TORCH_CHECK_VALUE(param.is_contiguous(), "param must be contiguous");
  check_float_input(delta, "delta", dev);
  check_like(delta, param, "delta");
  check_no_overlap(delta, "delta", param, "param");
  check_mode(mode);
  TORCH_CHECK_VALUE(sum_mode == kSumExact || sum_mode == kSumFp32, "sum_mode must be 0 or 1");
  check_stream(seed, offset, param.numel());
  TORCH_CHECK_VALUE(step >= 0, "step must be non-negative, got ", step);
  TORCH_CHECK_VALUE(!(master.has_value() && comp.has_value()),
                    "use either master weights or a compensation buffer, not both");
  UpdateCall c;
  c.a.sp = spec_from_list(fmt);
  std::vector<int64_t> fmt_c(fmt.begin(), fmt.end());
  fmt_c[6] = 0;  // the compensation buffer never saturates and rounds to nearest
  fmt_c[7] = 0;
  c.a.spc = spec_from_list(fmt_c);
  c.enc = enc_for(param.scalar_type(), c.a.sp);
  c.path = kStorage;
  c.t = UpdatePtrs{param.mutable_data_ptr(), delta.const_data_ptr<float>(), nullptr, nullptr};
  if (master.has_value()) {
    const at::Tensor& m = *master;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kFloat, "master must be float32, got ", m.scalar_type());
    check_like(m, param, "master");
    check_no_overlap(m, "master", param, "param");
    check_no_overlap(m, "master", delta, "delta");
    c.t.master = m.mutable_data_ptr<float>();
    c.path = kMaster;
  }
  if (comp.has_value()) {
    const at::Tensor& k = *comp;
    TORCH_CHECK_TYPE(k.scalar_type() == param.scalar_type(), "compensation must have param's dtype ",
                     param.scalar_type(), ", got ", k.scalar_type());
    check_like(k, param, "compensation");
    check_no_overlap(k, "compensation", param, "param");
    check_no_overlap(k, "compensation", delta, "delta");
    c.t.comp = k.mutable_data_ptr();
    c.path = kKahan;
  }
  c.a.mode = static_cast<int>(mode);
  c.a.sum_mode = static_cast<int>(sum_mode);
  c.a.alpha = static_cast<float>(alpha);
  c.a.decay = static_cast<float>(decay);
  c.a.seed = static_cast<uint64_t>(seed);
  c.a.offset = static_cast<uint64_t>(offset);
  c.a.step = static_cast<uint64_t>(step);
  c.n = param.numel();
  return c;
}

// The adam_step op's arguments, checked: the update (as apply_update's with delta = grad,
// alpha = 1) and the moments and coefficients.
struct AdamCall {
  UpdateCall u;
  const float* g;
  float* m;
  float* v;
  AdamCoef c;
};

inline AdamCall prepare_adam(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                             at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& master,
                             const std::optional<at::Tensor>& comp, c10::IntArrayRef fmt,
                             c10::IntArrayRef state_fmt, int64_t mode, int64_t sum_mode,
                             c10::ArrayRef<double> coef, int64_t variant, double decay,
                             int64_t seed, int64_t offset, int64_t step, c10::DeviceType dev) {
  TORCH_CHECK_VALUE(coef.size() == 6, "coef must hold 6 numbers, got ", coef.size());
  TORCH_CHECK_VALUE(variant >= 0 && variant < kAdamVariants && ((variant >> kAdamDivShift) & 3) < 3,
                    "invalid adam_step variant ", variant);
  for (double x : coef) TORCH_CHECK_VALUE(std::isfinite(x), "coef must be finite, got ", coef);
  AdamCall c;
  c.u = prepare_update(param, grad, master, comp, fmt, mode, sum_mode, 1.0, decay, seed, offset,
                       step, dev);
  const at::Tensor* others[] = {&param, &grad, master ? &*master : nullptr,
                                comp ? &*comp : nullptr};
  const char* names[] = {"param", "grad", "master", "compensation"};
  const std::pair<const at::Tensor*, const char*> moments[] = {{&exp_avg, "exp_avg"},
                                                               {&exp_avg_sq, "exp_avg_sq"}};
  for (const auto& [t, name] : moments) {
    check_float_input(*t, name, dev);
    check_like(*t, param, name);
    for (int k = 0; k < 4; ++k) {
      if (others[k]) check_no_overlap(*t, name, *others[k], names[k]);
    }
  }
  check_no_overlap(exp_avg, "exp_avg", exp_avg_sq, "exp_avg_sq");
  c.g = grad.const_data_ptr<float>();
  c.m = exp_avg.mutable_data_ptr<float>();
  c.v = exp_avg_sq.mutable_data_ptr<float>();
  c.c = make_adam_coef(coef.data(), static_cast<int>(variant), !state_fmt.empty(),
                       state_fmt.empty() ? c.u.a.sp : spec_from_list(state_fmt));
  return c;
}

}  // namespace gatesim
