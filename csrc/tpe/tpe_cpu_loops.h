// Raw-pointer row loops for the CPU kernels. Plain loops the compiler auto-vectorises; each
// has an AVX2 clone chosen at load time (RGPT4D_CPU_CLONES). float32 / bf16 / float64 rows;
// float16 goes through the generic templates in tpe.cpp.
#pragma once

#include "common/hd.h"

namespace rgpt4d {
namespace cpu {

RGPT4D_CPU_CLONES static void load_f32(const float* x, float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = x[i];
}
RGPT4D_CPU_CLONES static void load_bf16(const uint16_t* x, float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = bf16_bits_to_float(x[i]);
}
RGPT4D_CPU_CLONES static void store_f32(const float* v, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = v[i];
}
RGPT4D_CPU_CLONES static void store_bf16(const float* v, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16_bits(v[i]);
}

// y = x + e
RGPT4D_CPU_CLONES static void add_row_f32(const float* x, const float* e, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] + e[i];
}
RGPT4D_CPU_CLONES static void add_row_bf16(const uint16_t* x, const float* e, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16_bits(bf16_bits_to_float(x[i]) + e[i]);
}
// acc += x
RGPT4D_CPU_CLONES static void acc_row_f32(const float* x, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}
RGPT4D_CPU_CLONES static void acc_row_bf16(const uint16_t* x, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += bf16_bits_to_float(x[i]);
}
// v = x + e (float accumulation of a bf16 / f32 row), used by the downsample gather
RGPT4D_CPU_CLONES static void gather_add_f32(const float* x, const float* e, float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = x[i] + e[i];
}
RGPT4D_CPU_CLONES static void gather_add_bf16(const uint16_t* x, const float* e, float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = bf16_bits_to_float(x[i]) + e[i];
}

RGPT4D_CPU_CLONES static float sum_f32(const float* v, int64_t n) {
  // Eight independent partial sums: vectorisable without -ffast-math, fixed order.
  float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) p[k] += v[i + k];
  float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; i < n; ++i) s += v[i];
  return s;
}
RGPT4D_CPU_CLONES static float sumsq_centered_f32(const float* v, float mean, int64_t n) {
  float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const float c = v[i + k] - mean;
      p[k] += c * c;
    }
  float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; i < n; ++i) s += (v[i] - mean) * (v[i] - mean);
  return s;
}
// sum(a * b)
RGPT4D_CPU_CLONES static float dot_f32(const float* a, const float* b, int64_t n) {
  float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) p[k] += a[i + k] * b[i + k];
  float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
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
