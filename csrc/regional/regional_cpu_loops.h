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
