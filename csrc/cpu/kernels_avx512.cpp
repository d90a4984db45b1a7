// AVX-512 build of the CPU range kernels (chosen at run time when the CPU has
// AVX-512 F/BW/VL/DQ).
#if defined(__x86_64__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2,popcnt")
#elif defined(__x86_64__) && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2,popcnt"))), apply_to = function)
#endif
#define GS_ISA_AVX512 1
#define GS_TABLE kTableAvx512
#define GS_ISA_NAME "avx512"
#include "cpu/kernels_impl.h"
#if defined(__x86_64__) && defined(__clang__)
#pragma clang attribute pop
#endif
