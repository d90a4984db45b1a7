// Baseline x86-64 / any-architecture build of the CPU range kernels.
#define GS_TABLE kTableBase
#define GS_ISA_NAME "base"
#include "cpu/kernels_impl.h"
