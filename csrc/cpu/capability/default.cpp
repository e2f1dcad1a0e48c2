// The kernels for any CPU: at::vec's portable Vectorized (plain C++ loops that the
// compiler vectorizes with the baseline instruction set, SSE2 on x86-64).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu/kernel_table.h"
