// The kernels for AVX2 + FMA CPUs (8 float lanes), chosen at run time by kernels().
//
// setuptools gives every source of an extension the same flags, so instead of -mavx2 this
// file sets the instruction set itself: the target pragma applies to every function that
// follows, including at::vec's inline code, and the ISA macros that -mavx2 would define
// are defined by hand because GCC does not define them for a pragma and at::vec and
// sleef.h test them. PyTorch compiles its AVX2 kernels with the same set of features.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
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

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/kernel_table.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
