// Vector building blocks of the CPU loops: the AVX2 clone macro, the AVX2 check, the forced-inline
// macro, the fixed-order eight-lane sum, and the bf16 <-> float row conversions.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

// sum of term(i) over i in [0, n) in a fixed order that vectorises without -ffast-math: eight
// lane sums (lane k adds the terms 8j + k in order), added pairwise, then the last n % 8 terms in
// order. The order depends only on n: the same in every clone and on any thread count. Called
// from a RGPT4D_CPU_CLONES function, it is compiled (and vectorised) in each clone.
template <typename F>
RGPT4D_CPU_INLINE float lane8_sum(int64_t n, F term) {
  float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) p[k] += term(i + k);
  float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; i < n; ++i) s += term(i);
  return s;
}

// sum(a * b) in lane8_sum's order.
[[maybe_unused]] RGPT4D_CPU_CLONES static float dot_f32(const float* a, const float* b, int64_t n) {
  return lane8_sum(n, [&](int64_t i) { return a[i] * b[i]; });
}

// bf16 rows <-> float rows (round to nearest even on the way back; NaN stays NaN): at::vec's
// conversion, compiled in each clone, runs as fast as a hand-written loop (benchmarks/cpu_vec_bench.cc).
[[maybe_unused]] RGPT4D_CPU_CLONES static void load_bf16(const uint16_t* x, float* v, int64_t n) {
  at::vec::convert(reinterpret_cast<const c10::BFloat16*>(x), v, n);
}
[[maybe_unused]] RGPT4D_CPU_CLONES static void store_bf16(const float* v, uint16_t* y, int64_t n) {
  at::vec::convert(v, reinterpret_cast<c10::BFloat16*>(y), n);
}
[[maybe_unused]] RGPT4D_CPU_CLONES static void copy_f32(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i];
}

// A row of any element type (float, double, c10::BFloat16, c10::Half) to / from the accumulation
// type: a plain conversion loop, with the vectorised float and bf16 loops above where they apply.
template <typename S, typename A>
inline void load_row(const S* x, A* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<A>(x[i]);
}
inline void load_row(const float* x, float* v, int64_t n) { copy_f32(x, v, n); }
inline void load_row(const c10::BFloat16* x, float* v, int64_t n) {
  load_bf16(reinterpret_cast<const uint16_t*>(x), v, n);
}

template <typename A, typename S>
inline void store_row(const A* v, S* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<S>(v[i]);
}
inline void store_row(const float* v, float* y, int64_t n) { copy_f32(v, y, n); }
inline void store_row(const float* v, c10::BFloat16* y, int64_t n) {
  store_bf16(v, reinterpret_cast<uint16_t*>(y), n);
}

}  // namespace cpu
}  // namespace rgpt4d
