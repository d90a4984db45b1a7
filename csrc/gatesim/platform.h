// Qualifiers that let one function body compile for host and for CUDA device code.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GS_HD __host__ __device__ __forceinline__
#else
#define GS_HD inline __attribute__((always_inline))
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GS_UNROLL _Pragma("unroll")
#elif defined(__clang__)
#define GS_UNROLL _Pragma("clang loop unroll(full)")
#else
#define GS_UNROLL _Pragma("GCC unroll 16")
#endif
