// AVX2 build of the CPU range kernels (chosen at run time when the CPU has AVX2).
#if defined(__x86_64__) && !defined(__clang__)
#pragma GCC target("avx2,fma,bmi2,popcnt")
#elif defined(__x86_64__) && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,bmi2,popcnt"))), apply_to = function)
#endif
#define GS_ISA_AVX2 1
#define GS_TABLE kTableAvx2
#define GS_ISA_NAME "avx2"
#include "cpu/kernels_impl.h"
#if defined(__x86_64__) && defined(__clang__)
#pragma clang attribute pop
#endif
