// Operator schemas of gatesim, defined once; backends register kernels in
// cpu/ops_cpu.cpp (and cuda/ for CUDA). Python wrappers live in gatesim/_ops.py.
//
// A format travels as `int[] fmt` = [ebits, mbits, bias, subnormals, has_inf,
// nan_all_ones, saturate, rand_bits]; modes as ints (see gatesim/rounding.h).
#include <Python.h>
#include <torch/library.h>

#include <vector>

#include "format_check.h"
#include "gatesim/rounding.h"

extern "C" {
// Importing gatesim._C loads this library and so registers the ops with torch
// (the extension-cpp pattern); the module itself has no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace gatesim {

// The derived constants of a format as the kernels see them, for tests that hold
// gatesim.Format (Python) against the C++ derivation.
std::vector<int64_t> spec_numbers(c10::IntArrayRef fmt) {
  const Spec s = spec_from_list(fmt);
  return {s.ebits, s.m, s.bias, s.emin, s.msub, static_cast<int64_t>(s.max_bits),
          static_cast<int64_t>(s.q_bits), s.has_inf, s.nan_all_ones, s.saturate, s.uniform,
          s.rand_bits};
}

TORCH_LIBRARY(gatesim, m) {
  m.def("spec(int[] fmt) -> int[]", &spec_numbers);
  m.def("quantize(Tensor x, int[] fmt, int rmode, int seed, int offset, ScalarType dtype) -> Tensor");
  m.def(
      "quantize_out(Tensor x, int[] fmt, int rmode, int seed, int offset, Tensor(a!) out) -> ()");
  m.def("ulp(Tensor x, int[] fmt) -> Tensor");
  m.def("absorbed(Tensor w, Tensor delta, int[] fmt, int rmode, int seed, int offset) -> Tensor");
  m.def("random_bits_out(Tensor(a!) out, int seed, int offset) -> ()");
  // Returns (counts int64[kNumStats], absorbed mass float64[1]); see gatesim/update.h.
  m.def(
      "apply_update(Tensor(a!) param, Tensor delta, Tensor(b!)? master, Tensor(c!)? comp, "
      "int[] fmt, int rmode, int sum_mode, float alpha, float decay, int seed, int offset, "
      "int step, bool stats) -> (Tensor, Tensor)");
  // Adam's step direction from sqrt(v): out = (m * neg_step_size) / (root / bc2_sqrt + eps),
  // each operation rounded to fp32 as torch's single-tensor Adam does them (scalars
  // rounded to fp32 first). CPU only: torch's CUDA kernels divide by a scalar through its
  // reciprocal, so on CUDA the optimizers keep torch's own ops.
  m.def(
      "adam_direction_out(Tensor exp_avg, Tensor root, float bc2_sqrt, float eps, "
      "float neg_step_size, Tensor(a!) out) -> ()");
  // One Adam/AdamW step: the moments as torch's lerp_/mul_/addcmul_ (variant: which of
  // torch's equivalent formulas, see gatesim/adam.h; calibrated by gatesim.optim), the
  // direction as above and apply_update's write with alpha = 1, in one pass (CUDA) or
  // chunk by chunk in cache (CPU). coef = [1 - beta1, beta2, 1 - beta2,
  // sqrt(bias_correction2), eps, -step_size]; state_fmt empty: fp32 moments.
  m.def(
      "adam_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? master, Tensor(e!)? comp, int[] fmt, int[] state_fmt, int rmode, "
      "int sum_mode, float[] coef, int variant, float decay, int seed, int offset, int step, "
      "bool stats) -> (Tensor, Tensor)");
}

}  // namespace gatesim
