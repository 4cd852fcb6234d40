// Vector building blocks of the CPU loops: the AVX2 clone macro, the AVX2 check, the forced-inline
// macro, and the bf16 <-> float row conversions every family uses.
#pragma once

#include <cstdint>

#include "common/hd.h"

// Multi-versioned hot loops on x86-64 with GCC: one AVX2+FMA clone and a baseline clone,
// chosen at load time, so the wheel runs on any x86-64 CPU and vectorises where it can.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RGPT4D_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RGPT4D_CPU_CLONES
#endif

// Inlined whatever the compiler's heuristics say: the loop bodies instantiated per template flag.
#if defined(__GNUC__)
#define RGPT4D_CPU_INLINE inline __attribute__((always_inline))
#else
#define RGPT4D_CPU_INLINE inline
#endif

namespace rgpt4d {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// Whether this CPU runs the hand-written AVX2 loops (target("avx2") functions): read once.
inline bool cpu_has_avx2() {
  static const bool v = __builtin_cpu_supports("avx2");
  return v;
}
#endif

namespace cpu {

// bf16 rows <-> float rows (round to nearest even on the way back; NaN stays NaN).
RGPT4D_CPU_CLONES static void load_bf16(const uint16_t* x, float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = bf16_bits_to_float(x[i]);
}
RGPT4D_CPU_CLONES static void store_bf16(const float* v, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16_bits(v[i]);
}

}  // namespace cpu
}  // namespace rgpt4d
