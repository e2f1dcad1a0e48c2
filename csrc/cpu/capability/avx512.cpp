// The kernels for AVX-512 CPUs (16 float lanes: F, BW, VL, DQ, as PyTorch's AVX512
// capability), chosen at run time by kernels(). How the instruction set is selected
// without per-file compiler flags: see avx2.cpp.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq"))), apply_to = function)
#else
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq")
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif

#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/kernel_table.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
