// Raw-pointer float32 loops of the LM ops' CPU kernels (lm_norm.cpp). Plain loops the compiler
// auto-vectorises; each has an AVX2 clone chosen at load time (RGPT4D_CPU_CLONES). exp is a
// Cephes-style polynomial (~1 ulp over the clamped range) written with arithmetic and bit casts
// only, so the loops vectorise without -ffast-math (libm's expf would keep them scalar).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#include "cpu/runtime.h"

namespace rgpt4d {
namespace cpu {

// exp(x) for x in [-87, 0].
static inline float lm_exp_nonpos(float x) {
  float fx;
  const float y = cephes_exp_parts(x, fx);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(fx) + 127) << 23;
  return y * std::bit_cast<float>(bits);
}

// sigmoid(g) = 1 / (1 + exp(-g)) from e = exp(-|g|) (|g| capped at 87, where e ~ 2e-38): 1 / (1 + e)
// for g >= 0, e / (1 + e) below. The cap and the sign test work on the bits (integer compares: a
// float compare could trap under -ftrapping-math and would keep the loop scalar). A NaN g gives a
// finite value here; the SwiGLU products with g itself stay NaN.
static inline float lm_sigmoid_f32(float g) {
  const uint32_t b = std::bit_cast<uint32_t>(g);
  uint32_t mag = b & 0x7fffffffu;
  mag = mag < 0x42ae0000u ? mag : 0x42ae0000u;  // 87.0f
  const float e = lm_exp_nonpos(-std::bit_cast<float>(mag));
  const float neg = static_cast<float>(static_cast<int32_t>(b >> 31));  // 1 for g < 0 (arithmetic, no select)
  return (1.0f + neg * (e - 1.0f)) / (1.0f + e);
}

RGPT4D_CPU_CLONES static void swiglu_fwd_f32(const float* __restrict__ g, const float* __restrict__ u,
                                             float* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gv = g[i];
    y[i] = gv * lm_sigmoid_f32(gv) * u[i];
  }
}

RGPT4D_CPU_CLONES static void swiglu_bwd_f32(const float* __restrict__ gy, const float* __restrict__ g,
                                             const float* __restrict__ u, float* __restrict__ dg,
                                             float* __restrict__ du, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gv = g[i], s = lm_sigmoid_f32(gv), gr = gy[i];
    du[i] = gr * gv * s;
    dg[i] = gr * u[i] * s * (1.0f + gv * (1.0f - s));
  }
}

// Eight independent partial sums: vectorisable without -ffast-math, fixed order.
RGPT4D_CPU_CLONES static float sumsq_f32(const float* x, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += x[i + k] * x[i + k];
  float s = 0;
  for (; i < n; ++i) s += x[i] * x[i];
  return s + ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

RGPT4D_CPU_CLONES static float dot3_f32(const float* a, const float* b, const float* c, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k] * c[i + k];
  float s = 0;
  for (; i < n; ++i) s += a[i] * b[i] * c[i];
  return s + ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

RGPT4D_CPU_CLONES static void rms_row_f32(const float* __restrict__ x, const float* __restrict__ w, float rs,
                                          float* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * rs);
}

RGPT4D_CPU_CLONES static void rms_grad_row_f32(const float* __restrict__ g, const float* __restrict__ w,
                                               const float* __restrict__ x, float rs, float c,
                                               float* __restrict__ gx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gx[i] = rs * (g[i] * w[i] - x[i] * c);
}

RGPT4D_CPU_CLONES static void rms_gw_row_f32(const float* __restrict__ g, const float* __restrict__ x, float rs,
                                             float* __restrict__ acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += g[i] * x[i] * rs;
}

// RoPE of one row of `2h` elements: o[i] = x[i] c[i] - x[i+h] s[i], o[i+h] = x[i+h] c[i+h] + x[i] s[i+h]
// (x * cos + rotate_half(x) * sin). sign = -1 gives the backward (the transpose of the rotation).
RGPT4D_CPU_CLONES static void rope_row_f32(const float* __restrict__ x, const float* __restrict__ c,
                                           const float* __restrict__ s, float* __restrict__ o, int64_t h) {
  for (int64_t i = 0; i < h; ++i) {
    o[i] = x[i] * c[i] - x[i + h] * s[i];
    o[i + h] = x[i + h] * c[i + h] + x[i] * s[i + h];
  }
}

RGPT4D_CPU_CLONES static void rope_grad_row_f32(const float* __restrict__ g, const float* __restrict__ c,
                                                const float* __restrict__ s, float* __restrict__ o, int64_t h) {
  for (int64_t i = 0; i < h; ++i) {
    o[i] = g[i] * c[i] + g[i + h] * s[i + h];
    o[i + h] = g[i + h] * c[i + h] - g[i] * s[i];
  }
}

}  // namespace cpu
}  // namespace rgpt4d
