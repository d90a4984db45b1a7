// Range kernels of the CPU backend, one table per instruction set. The table entries
// process elements [begin, end) of contiguous buffers on the calling thread; threading
// lives in ops_cpu.cpp. Each ISA variant is the same source (kernels_impl.h) compiled
// with different target flags, and results are bit-identical across variants because
// all arithmetic is integer (or exact IEEE addition).
#pragma once
#include <cstdint>

#include "gatesim/adam.h"
#include "gatesim/rounding.h"
#include "gatesim/update.h"

namespace gatesim {
namespace cpu {


// Elements per statistics block of apply_update (fixed: results must not depend on
// how work is split).
constexpr int64_t kUpdateBlock = 4096;

struct KernelTable {
  const char* name;
  void (*quantize)(const uint32_t* x, void* y, int enc, int64_t begin, int64_t end,
                   const Spec& sp, int mode, uint64_t seed, uint64_t offset);
  void (*ulp)(const uint32_t* x, uint32_t* y, int64_t begin, int64_t end, const Spec& sp);
  void (*absorbed)(const float* w, const float* dl, bool* y, int64_t begin, int64_t end,
                   const Spec& sp, int mode, uint64_t seed, uint64_t offset);
  void (*random_bits)(uint32_t* y, int64_t begin, int64_t end, uint64_t seed, uint64_t offset);
  // Blocks [b_begin, b_end) of kUpdateBlock elements; see update_impl.h.
  void (*apply_update)(const UpdatePtrs& t, const UpdateArgs& a, int path, int enc, bool stats,
                       int64_t b_begin, int64_t b_end, int64_t n, int64_t* counts,
                       double* block_mass);
  void (*adam_direction)(const float* m, const float* root, float* out, int64_t begin,
                         int64_t end, float bc2_sqrt, float eps, float neg_step_size);
  // Adam's moments in place, in the variant's forms (gatesim/adam.h).
  void (*adam_moments)(const float* g, float* m, float* v, int64_t begin, int64_t end,
                       const AdamCoef& c);
  void (*sqrt)(const float* x, float* y, int64_t begin, int64_t end);
};

extern const KernelTable kTableBase;
extern const KernelTable kTableAvx2;
extern const KernelTable kTableAvx512;

}  // namespace cpu
}  // namespace gatesim
