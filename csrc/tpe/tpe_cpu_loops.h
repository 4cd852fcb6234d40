// Raw-pointer row loops for the CPU kernels. Plain loops the compiler auto-vectorises; each
// has an AVX2 clone chosen at load time (RGPT4D_CPU_CLONES). float32 / bf16 / float64 rows;
// float16 goes through the generic templates in tpe.cpp.
#pragma once

#include "cpu/runtime.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

namespace rgpt4d {
namespace cpu {


// y = x + e
RGPT4D_CPU_CLONES static void add_row_f32(const float* x, const float* e, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] + e[i];
}
RGPT4D_CPU_CLONES static void add_row_bf16(const uint16_t* x, const float* e, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16_bits(bf16_bits_to_float(x[i]) + e[i]);
}
// y = x + e with streaming stores (cpu/stream.h), for outputs far larger than the cache.
// The add and the store stay in one loop: computing a whole row into an L1 buffer and then
// streaming it out is slower than ordinary stores (the reads of x and the writes of y no longer
// overlap), while this loop takes ~40% less time than ordinary stores on 51 MB of rows
// (benchmarks/bench_tpe.py, tpe_add forward). Caller: stream_fence() after the last row.
inline void add_row_f32_stream(const float* x, const float* e, float* y, int64_t n) {
#if defined(RGPT4D_HAVE_STREAM_STORES)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(y + i) & 15) != 0; ++i) y[i] = x[i] + e[i];
  for (; i + 4 <= n; i += 4) _mm_stream_ps(y + i, _mm_add_ps(_mm_loadu_ps(x + i), _mm_loadu_ps(e + i)));
  for (; i < n; ++i) y[i] = x[i] + e[i];
#else
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] + e[i];
#endif
}

// acc += x (the table gradient's sum over tokens: x streams from memory, acc stays in L1).
RGPT4D_CPU_CLONES static void acc_row_f32_generic(const float* x, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}
RGPT4D_CPU_CLONES static void acc_row_bf16_generic(const uint16_t* x, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += bf16_bits_to_float(x[i]);
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define RGPT4D_TPE_AVX2 1
// AVX2 versions that load four vectors of x and acc before storing any: GCC's vectorisation of
// the loops above alternates load, add, store one vector at a time, and that runs 20-25% slower
// (benchmarks/bench_tpe.py, the table gradient). Same additions in the same order: bitwise equal.

// Eight elements of x as floats (bf16: the bits shifted into the high half).
__attribute__((target("avx2"))) inline __m256 load8_f32(const float* x) { return _mm256_loadu_ps(x); }
__attribute__((target("avx2"))) inline __m256 load8_f32(const uint16_t* x) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_bits_to_float(v); }

template <typename T>
__attribute__((target("avx2"))) void acc_row_avx2(const T* x, float* acc, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 a0 = _mm256_add_ps(_mm256_loadu_ps(acc + i), load8_f32(x + i));
    const __m256 a1 = _mm256_add_ps(_mm256_loadu_ps(acc + i + 8), load8_f32(x + i + 8));
    const __m256 a2 = _mm256_add_ps(_mm256_loadu_ps(acc + i + 16), load8_f32(x + i + 16));
    const __m256 a3 = _mm256_add_ps(_mm256_loadu_ps(acc + i + 24), load8_f32(x + i + 24));
    _mm256_storeu_ps(acc + i, a0);
    _mm256_storeu_ps(acc + i + 8, a1);
    _mm256_storeu_ps(acc + i + 16, a2);
    _mm256_storeu_ps(acc + i + 24, a3);
  }
  for (; i < n; ++i) acc[i] += to_f32(x[i]);
}
#endif

inline void acc_row_f32(const float* x, float* acc, int64_t n) {
#if defined(RGPT4D_TPE_AVX2)
  if (cpu_has_avx2()) return acc_row_avx2(x, acc, n);
#endif
  acc_row_f32_generic(x, acc, n);
}
inline void acc_row_bf16(const uint16_t* x, float* acc, int64_t n) {
#if defined(RGPT4D_TPE_AVX2)
  if (cpu_has_avx2()) return acc_row_avx2(x, acc, n);
#endif
  acc_row_bf16_generic(x, acc, n);
}
// v = x + e (float accumulation of a bf16 / f32 row), used by the downsample gather
RGPT4D_CPU_CLONES static void gather_add_f32(const float* x, const float* e, float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = x[i] + e[i];
}
RGPT4D_CPU_CLONES static void gather_add_bf16(const uint16_t* x, const float* e, float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = bf16_bits_to_float(x[i]) + e[i];
}

RGPT4D_CPU_CLONES static float sum_f32(const float* v, int64_t n) {
  return lane8_sum(n, [&](int64_t i) { return v[i]; });
}
RGPT4D_CPU_CLONES static float sumsq_centered_f32(const float* v, float mean, int64_t n) {
  return lane8_sum(n, [&](int64_t i) { return (v[i] - mean) * (v[i] - mean); });
}
// v <- (v - mean) * rstd  (v becomes xhat)
RGPT4D_CPU_CLONES static void normalize_f32(float* v, float mean, float rstd, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = (v[i] - mean) * rstd;
}
// v <- v * w + b   (w or b may be null)
RGPT4D_CPU_CLONES static void affine_f32(float* v, const float* w, const float* b, int64_t n) {
  if (w && b) {
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] * w[i] + b[i];
  } else if (w) {
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] * w[i];
  } else if (b) {
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] + b[i];
  }
}
// g <- g * w
RGPT4D_CPU_CLONES static void mul_f32(float* g, const float* w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = g[i] * w[i];
}
// dv = rstd * (gw - c1 - xhat * c2), written over gw
RGPT4D_CPU_CLONES static void ln_dx_f32(float* gw, const float* xhat, float rstd, float c1, float c2, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gw[i] = rstd * (gw[i] - c1 - xhat[i] * c2);
}
// acc_w += g * xhat ; acc_b += g
RGPT4D_CPU_CLONES static void ln_wb_acc_f32(const float* g, const float* xhat, float* acc_w, float* acc_b, int64_t n) {
  if (acc_w)
    for (int64_t i = 0; i < n; ++i) acc_w[i] += g[i] * xhat[i];
  if (acc_b)
    for (int64_t i = 0; i < n; ++i) acc_b[i] += g[i];
}

}  // namespace cpu
}  // namespace rgpt4d
