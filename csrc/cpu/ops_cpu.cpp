// CPU kernels of the gatesim ops: argument checks, threading, ISA dispatch.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "cpu/kernels.h"
#include "format_check.h"
#include "op_checks.h"
#include "gatesim/rounding.h"

namespace gatesim {
namespace cpu {
namespace {

constexpr int64_t kGrain = 1 << 16;

// Kernels use fp32/fp64 arithmetic (sums, fma, conversions) whose results must be IEEE:
// with flush-to-zero or denormals-are-zero set (torch.set_flush_denormal(True) sets both
// on the calling thread) subnormal values would silently become 0 and results would
// depend on which thread ran a chunk. Each kernel call runs with both cleared and the
// thread's previous setting restored afterwards.
class IeeeDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  IeeeDenormals() : saved_(_mm_getcsr()) {
    constexpr unsigned kFtz = 0x8000u, kDaz = 0x0040u;
    if (saved_ & (kFtz | kDaz)) _mm_setcsr(saved_ & ~(kFtz | kDaz));
  }
  ~IeeeDenormals() {
    if (_mm_getcsr() != saved_) _mm_setcsr(saved_);
  }

 private:
  unsigned saved_;
#endif
};

// at::parallel_for with IEEE denormals on every thread that runs a chunk.
template <class F>
void parallel_ieee(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    IeeeDenormals ieee;
    f(b, e);
  });
}

bool cpu_has(const char* isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (std::strcmp(isa, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  if (std::strcmp(isa, "avx2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
#endif
  return std::strcmp(isa, "base") == 0;
}

// The best table this CPU runs; GATESIM_CPU_ISA=base|avx2|avx512 forces one (tests
// use it to show every variant gives the same bits).
const KernelTable* pick_table() {
  if (const char* want = std::getenv("GATESIM_CPU_ISA")) {
    TORCH_CHECK_VALUE(cpu_has(want), "GATESIM_CPU_ISA=", want,
                      " is not available on this CPU (use base, avx2 or avx512)");
    if (std::strcmp(want, "avx512") == 0) return &kTableAvx512;
    if (std::strcmp(want, "avx2") == 0) return &kTableAvx2;
    return &kTableBase;
  }
  if (cpu_has("avx512")) return &kTableAvx512;
  if (cpu_has("avx2")) return &kTableAvx2;
  return &kTableBase;
}

const KernelTable& table() {
  static const KernelTable* t = pick_table();
  return *t;
}

void quantize_out_cpu(const at::Tensor& x, c10::IntArrayRef fmt, int64_t mode, int64_t seed,
                      int64_t offset, at::Tensor& out) {
  check_float_input(x, "x", at::kCPU);
  check_mode(mode);
  check_stream(seed, offset, x.numel());
  const Spec sp = spec_from_list(fmt);
  TORCH_CHECK_VALUE(out.device().is_cpu(), "out must be on the CPU, got ", out.device());
  TORCH_CHECK_VALUE(out.sizes() == x.sizes(), "out has shape ", out.sizes(), ", x has ",
                    x.sizes());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous");
  const int enc = enc_for(out.scalar_type(), sp);
  const auto* xp = static_cast<const uint32_t*>(x.const_data_ptr());
  void* yp = out.mutable_data_ptr();
  const KernelTable& t = table();
  parallel_ieee(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
    t.quantize(xp, yp, enc, b, e, sp, static_cast<int>(mode), static_cast<uint64_t>(seed),
               static_cast<uint64_t>(offset));
  });
}

at::Tensor quantize_cpu(const at::Tensor& x, c10::IntArrayRef fmt, int64_t mode, int64_t seed,
                        int64_t offset, at::ScalarType dtype) {
  check_float_input(x, "x", at::kCPU);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  quantize_out_cpu(x, fmt, mode, seed, offset, out);
  return out;
}

at::Tensor ulp_cpu(const at::Tensor& x, c10::IntArrayRef fmt) {
  check_float_input(x, "x", at::kCPU);
  const Spec sp = spec_from_list(fmt);
  at::Tensor out = at::empty_like(x);
  const auto* xp = static_cast<const uint32_t*>(x.const_data_ptr());
  auto* yp = static_cast<uint32_t*>(out.mutable_data_ptr());
  const KernelTable& t = table();
  parallel_ieee(0, x.numel(), kGrain,
                   [&](int64_t b, int64_t e) { t.ulp(xp, yp, b, e, sp); });
  return out;
}

at::Tensor absorbed_cpu(const at::Tensor& w, const at::Tensor& delta, c10::IntArrayRef fmt,
                        int64_t mode, int64_t seed, int64_t offset) {
  check_float_input(w, "w", at::kCPU);
  check_float_input(delta, "delta", at::kCPU);
  TORCH_CHECK_VALUE(w.sizes() == delta.sizes(), "delta has shape ", delta.sizes(),
                    ", w has ", w.sizes());
  check_mode(mode);
  check_stream(seed, offset, w.numel());
  const Spec sp = spec_from_list(fmt);
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kBool));
  const auto* wp = w.const_data_ptr<float>();
  const auto* dp = delta.const_data_ptr<float>();
  auto* yp = out.mutable_data_ptr<bool>();
  const KernelTable& t = table();
  parallel_ieee(0, w.numel(), kGrain, [&](int64_t b, int64_t e) {
    t.absorbed(wp, dp, yp, b, e, sp, static_cast<int>(mode), static_cast<uint64_t>(seed),
               static_cast<uint64_t>(offset));
  });
  return out;
}

void random_bits_out_cpu(at::Tensor& out, int64_t seed, int64_t offset) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kInt || out.scalar_type() == at::kUInt32,
                   "out must be int32 or uint32, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous");
  check_stream(seed, offset, out.numel());
  auto* yp = static_cast<uint32_t*>(out.mutable_data_ptr());
  const KernelTable& t = table();
  parallel_ieee(0, out.numel(), kGrain, [&](int64_t b, int64_t e) {
    t.random_bits(yp, b, e, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  });
}

// The statistics outputs of one update of n elements: the integer counts (filled by the
// kernels with atomic adds) and one absorbed mass per statistics block, summed at the end.
class UpdateOutputs {
 public:
  UpdateOutputs(const at::Tensor& param, int64_t n, bool stats)
      : stats_(stats),
        nblocks_((n + kUpdateBlock - 1) / kUpdateBlock),
        counts_(at::zeros({kNumStats}, param.options().dtype(at::kLong))),
        mass_(at::zeros({1}, param.options().dtype(at::kDouble))),
        block_mass_(stats ? nblocks_ : 0, 0.0) {}
  int64_t nblocks() const { return nblocks_; }
  int64_t* counts() { return counts_.mutable_data_ptr<int64_t>(); }
  double* block_mass() { return block_mass_.data(); }
  // The blocks by the same fixed tree as within a block: the same sum for any thread count.
  std::tuple<at::Tensor, at::Tensor> finish() {
    IeeeDenormals ieee;
    int64_t padded = 1;
    while (padded < nblocks_) padded <<= 1;
    block_mass_.resize(stats_ ? padded : 0, 0.0);
    mass_.mutable_data_ptr<double>()[0] = stats_ ? tree_sum(block_mass_.data(), padded) : 0.0;
    return {counts_, mass_};
  }

 private:
  bool stats_;
  int64_t nblocks_;
  at::Tensor counts_, mass_;
  std::vector<double> block_mass_;
};

std::tuple<at::Tensor, at::Tensor> apply_update_cpu(
    at::Tensor& param, const at::Tensor& delta, const std::optional<at::Tensor>& master,
    const std::optional<at::Tensor>& comp, c10::IntArrayRef fmt, int64_t mode, int64_t sum_mode,
    double alpha, double decay, int64_t seed, int64_t offset, int64_t step, bool stats) {
  const UpdateCall c = prepare_update(param, delta, master, comp, fmt, mode, sum_mode, alpha,
                                      decay, seed, offset, step, at::kCPU);
  UpdateOutputs out(param, c.n, stats);
  int64_t* cp = out.counts();
  double* bm = out.block_mass();
  const KernelTable& tb = table();
  parallel_ieee(0, out.nblocks(), 4, [&](int64_t b0, int64_t b1) {
    tb.apply_update(c.t, c.a, c.path, c.enc, stats, b0, b1, c.n, cp, bm);
  });
  return out.finish();
}

std::string cpu_isa() { return table().name; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(gatesim, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
}

void adam_direction_out_cpu(const at::Tensor& exp_avg, const at::Tensor& root, double bc2_sqrt,
                            double eps, double neg_step_size, at::Tensor& out) {
  check_float_input(exp_avg, "exp_avg", at::kCPU);
  check_float_input(root, "root", at::kCPU);
  check_float_input(out, "out", at::kCPU);
  for (const at::Tensor* t : {&root, static_cast<const at::Tensor*>(&out)}) {
    TORCH_CHECK_VALUE(t->sizes() == exp_avg.sizes(), "adam_direction: shapes differ: ",
                      exp_avg.sizes(), " and ", t->sizes());
  }
  // elementwise: out may be an input itself, but not overlap one partially
  for (const at::Tensor* t : {&exp_avg, &root}) {
    TORCH_CHECK_VALUE(at::get_overlap_status(out, *t) != at::MemOverlapStatus::Partial,
                      "adam_direction: out partially overlaps an input");
  }
  const float* mp = exp_avg.const_data_ptr<float>();
  const float* rp = root.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  // torch rounds a Python scalar to the tensor's dtype before the operation
  const float b = static_cast<float>(bc2_sqrt), e = static_cast<float>(eps),
              s = static_cast<float>(neg_step_size);
  const KernelTable& t = table();
  parallel_ieee(0, exp_avg.numel(), kGrain,
                [&](int64_t lo, int64_t hi) { t.adam_direction(mp, rp, op, lo, hi, b, e, s); });
}

// Elements per chunk of the fused Adam step: the moments, the sqrt, the direction and the
// write of one chunk run back to back while its data is in the core's cache (8 statistics
// blocks, about 700 KB of operands); chunks are whole statistics blocks, so the block
// masses and the random positions are those of apply_update on the whole tensor.
constexpr int64_t kAdamChunk = 8 * kUpdateBlock;

std::tuple<at::Tensor, at::Tensor> adam_step_cpu(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
    const std::optional<at::Tensor>& master, const std::optional<at::Tensor>& comp,
    c10::IntArrayRef fmt, c10::IntArrayRef state_fmt, int64_t mode, int64_t sum_mode,
    c10::ArrayRef<double> coef, int64_t variant, double decay, int64_t seed, int64_t offset,
    int64_t step, bool stats) {
  const AdamCall c = prepare_adam(param, grad, exp_avg, exp_avg_sq, master, comp, fmt,
                                  state_fmt, mode, sum_mode, coef, variant, decay, seed, offset,
                                  step, at::kCPU);
  TORCH_CHECK_VALUE(((variant >> kAdamDivShift) & 3) == 0,
                    "adam_step on the CPU divides by sqrt(bias_correction2), as torch's CPU "
                    "kernels do: variant bits 3-4 must be 0, got variant ", variant);
  const UpdatePtrs& t = c.u.t;
  const UpdateArgs& a = c.u.a;
  const int path = c.u.path, enc = c.u.enc;
  const int64_t n = c.u.n;
  UpdateOutputs out(param, n, stats);
  int64_t* cp = out.counts();
  double* bm = out.block_mass();
  const KernelTable& tb = table();
  const bool torch_sqrt = (variant & kAdamTorchSqrt) != 0;
  const at::Tensor v_flat = exp_avg_sq.view({-1});
  const int ebytes = enc == kEncF32 ? 4 : (enc == kEnc8 ? 1 : 2);
  const int64_t nchunks = (n + kAdamChunk - 1) / kAdamChunk;
  parallel_ieee(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> scratch(static_cast<size_t>(kAdamChunk));
    for (int64_t ci = c0; ci < c1; ++ci) {
      const int64_t s = ci * kAdamChunk;
      const int64_t len = (n - s) < kAdamChunk ? (n - s) : kAdamChunk;
      float* root = scratch.data();
      tb.adam_moments(c.g + s, c.m + s, c.v + s, 0, len, c.c);
      if (torch_sqrt) {  // torch's own sqrt (MKL's on most builds), on this chunk
        at::Tensor out = at::from_blob(root, {len}, v_flat.options());
        at::sqrt_out(out, v_flat.narrow(0, s, len));
      } else {
        tb.sqrt(c.v + s, root, 0, len);
      }
      tb.adam_direction(c.m + s, root, root, 0, len, c.c.bc2, c.c.eps, c.c.neg_step);
      // apply_update of this chunk: every pointer and the random position shifted to it
      UpdatePtrs tl = t;
      tl.param = static_cast<char*>(t.param) + s * ebytes;
      tl.delta = root;
      if (t.master) tl.master = t.master + s;
      if (t.comp) tl.comp = static_cast<char*>(t.comp) + s * ebytes;
      UpdateArgs al = a;
      al.offset = a.offset + static_cast<uint64_t>(s);
      tb.apply_update(tl, al, path, enc, stats, 0, (len + kUpdateBlock - 1) / kUpdateBlock, len,
                      cp, stats ? bm + s / kUpdateBlock : nullptr);
    }
  });
  return out.finish();
}

TORCH_LIBRARY_IMPL(gatesim, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("quantize_out", &quantize_out_cpu);
  m.impl("ulp", &ulp_cpu);
  m.impl("absorbed", &absorbed_cpu);
  m.impl("random_bits_out", &random_bits_out_cpu);
  m.impl("apply_update", &apply_update_cpu);
  m.impl("adam_direction_out", &adam_direction_out_cpu);
  m.impl("adam_step", &adam_step_cpu);
}

}  // namespace cpu
}  // namespace gatesim
