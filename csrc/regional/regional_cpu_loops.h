// Raw-pointer channel loops of the regional CPU kernels. Plain loops the compiler auto-vectorises;
// each has an AVX2 clone chosen at load time (RGPT4D_CPU_CLONES). float32 and bf16 rows; other
// dtypes go through the generic templates in regional.cpp.
#pragma once

#include "common/hd.h"

namespace rgpt4d {
namespace cpu {

// acc += a * x
RGPT4D_CPU_CLONES static void rg_axpy_f32(float a, const float* x, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a * x[i];
}
RGPT4D_CPU_CLONES static void rg_axpy_bf16(float a, const uint16_t* x, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a * bf16_bits_to_float(x[i]);
}

// sum(a * x), eight fixed partial sums (vectorisable without -ffast-math, order fixed).
RGPT4D_CPU_CLONES static float rg_dot_f32(const float* a, const float* x, int64_t n) {
  float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) p[k] += a[i + k] * x[i + k];
  float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; i < n; ++i) s += a[i] * x[i];
  return s;
}
RGPT4D_CPU_CLONES static float rg_dot_bf16(const float* a, const uint16_t* x, int64_t n) {
  float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) p[k] += a[i + k] * bf16_bits_to_float(x[i + k]);
  float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; i < n; ++i) s += a[i] * bf16_bits_to_float(x[i]);
  return s;
}

// sum(w[t] * base[off[t]]): one output cell of a planar map from its flattened 2D taps.
RGPT4D_CPU_CLONES static float rg_gather_dot_f32(const float* base, const int64_t* off, const float* w, int64_t n) {
  float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) p[k] += w[i + k] * base[off[i + k]];
  float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; i < n; ++i) s += w[i] * base[off[i]];
  return s;
}
RGPT4D_CPU_CLONES static float rg_gather_dot_bf16(const uint16_t* base, const int64_t* off, const float* w, int64_t n) {
  float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) p[k] += w[i + k] * bf16_bits_to_float(base[off[i + k]]);
  float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; i < n; ++i) s += w[i] * bf16_bits_to_float(base[off[i]]);
  return s;
}

// out[r] = sum_p rows[r][p] * x[p] for 8 rows at once: one pass over x and eight independent
// accumulator chains (a lone dot product is bound by the FMA latency). Fixed summation order.
RGPT4D_CPU_CLONES static void rg_dots8_f32(const float* const* rows, const float* x, int64_t n, float* out) {
  float acc[8][8] = {};
  int64_t p = 0;
  for (; p + 8 <= n; p += 8)
    for (int r = 0; r < 8; ++r)
      for (int k = 0; k < 8; ++k) acc[r][k] += rows[r][p + k] * x[p + k];
  for (int r = 0; r < 8; ++r) {
    float s = ((acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3])) + ((acc[r][4] + acc[r][5]) + (acc[r][6] + acc[r][7]));
    for (int64_t q = p; q < n; ++q) s += rows[r][q] * x[q];
    out[r] = s;
  }
}
RGPT4D_CPU_CLONES static void rg_dots8_bf16(const float* const* rows, const uint16_t* x, int64_t n, float* out) {
  float acc[8][8] = {};
  int64_t p = 0;
  for (; p + 8 <= n; p += 8) {
    float xv[8];
    for (int k = 0; k < 8; ++k) xv[k] = bf16_bits_to_float(x[p + k]);
    for (int r = 0; r < 8; ++r)
      for (int k = 0; k < 8; ++k) acc[r][k] += rows[r][p + k] * xv[k];
  }
  for (int r = 0; r < 8; ++r) {
    float s = ((acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3])) + ((acc[r][4] + acc[r][5]) + (acc[r][6] + acc[r][7]));
    for (int64_t q = p; q < n; ++q) s += rows[r][q] * bf16_bits_to_float(x[q]);
    out[r] = s;
  }
}

// y[p] = sum_{r < nr} coef[r] * rows[r][p]: eight outputs per pass over the rows, kept in registers.
RGPT4D_CPU_CLONES static void rg_combine_f32(const float* const* rows, const float* coef, int64_t nr, int64_t n,
                                             float* y) {
  int64_t p = 0;
  for (; p + 8 <= n; p += 8) {
    float s[8] = {};
    for (int64_t r = 0; r < nr; ++r)
      for (int k = 0; k < 8; ++k) s[k] += coef[r] * rows[r][p + k];
    for (int k = 0; k < 8; ++k) y[p + k] = s[k];
  }
  for (; p < n; ++p) {
    float s = 0;
    for (int64_t r = 0; r < nr; ++r) s += coef[r] * rows[r][p];
    y[p] = s;
  }
}

// y = v (+ e), converting to the output dtype; e may be null.
RGPT4D_CPU_CLONES static void rg_store_f32(const float* v, const float* e, float* y, int64_t n) {
  if (e) {
    for (int64_t i = 0; i < n; ++i) y[i] = v[i] + e[i];
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = v[i];
  }
}
RGPT4D_CPU_CLONES static void rg_store_bf16(const float* v, const float* e, uint16_t* y, int64_t n) {
  if (e) {
    for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16_bits(v[i] + e[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16_bits(v[i]);
  }
}

}  // namespace cpu
}  // namespace rgpt4d
