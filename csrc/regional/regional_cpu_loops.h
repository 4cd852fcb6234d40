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

// ---- weighted window sums ----------------------------------------------------------------------
// Mask pooling and RoIAlign both reduce, per output cell, a small dense weight patch against the
// same-sized window of a feature plane: a mask over the rectangle that holds its non-zeros (object
// masks cover a small part of the frame), a RoI cell over the rectangle its bilinear taps span.
// Windows: rows [y0, y1) x columns [x0, x1) of an H x W grid.
struct RgWindow {
  int64_t y0, y1, x0, x1;
};

// The window widened to a multiple of 8 columns where the row has room (moved left at the row's
// end), so that the patch sums below run in whole vectors; the extra columns must weigh zero.
inline RgWindow rg_vector_window(RgWindow w, int64_t W) {
  const int64_t span = (w.x1 - w.x0 + 7) / 8 * 8;
  if (w.x1 > w.x0 && span <= W) {
    w.x0 = w.x0 < W - span ? w.x0 : W - span;
    w.x1 = w.x0 + span;
  }
  return w;
}

// Eight floats as one value (GCC/Clang vector extension): an AVX register in the x86-64-v3 clone,
// two SSE registers in the baseline one. The auto-vectoriser does not keep the four accumulator
// sets below in registers; these do. (Always inlined: no function passes them by value, so
// -Wpsabi's ABI note does not apply.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float RgF8 __attribute__((vector_size(32)));
typedef uint16_t RgU16x8 __attribute__((vector_size(16)));
typedef uint32_t RgU32x8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline RgF8 rg_load8(const float* p) {
  RgF8 v;
  memcpy(&v, p, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline RgF8 rg_load8(const uint16_t* p) {  // bf16 bits -> float
  RgU16x8 h;
  memcpy(&h, p, sizeof(h));
  const RgU32x8 u = __builtin_convertvector(h, RgU32x8) << 16;
  RgF8 v;
  memcpy(&v, &u, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline float rg_load1(float v) { return v; }
__attribute__((always_inline)) inline float rg_load1(uint16_t v) { return bf16_bits_to_float(v); }

__attribute__((always_inline)) inline float rg_hsum8(RgF8 a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// out[j] = sum_{y < rows, x < cols} p[y * sP + x] * planes[j][y * sH + x] for four planes at once
// (four independent accumulators; callers repeat a plane when they have fewer). p and the planes
// point at the window's corner. Columns go eight at a time, any rest one by one; fixed order.
template <typename S>
__attribute__((always_inline)) inline void rg_patch_dots4(const float* p, int64_t sP, const S* const* planes,
                                                          int64_t sH, int64_t rows, int64_t cols, float* out) {
  RgF8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  float t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  const int64_t xv = cols / 8 * 8;
  for (int64_t y = 0; y < rows; ++y) {
    const float* pr = p + y * sP;
    const S* f0 = planes[0] + y * sH;
    const S* f1 = planes[1] + y * sH;
    const S* f2 = planes[2] + y * sH;
    const S* f3 = planes[3] + y * sH;
    for (int64_t x = 0; x < xv; x += 8) {
      const RgF8 wk = rg_load8(pr + x);
      a0 += wk * rg_load8(f0 + x);
      a1 += wk * rg_load8(f1 + x);
      a2 += wk * rg_load8(f2 + x);
      a3 += wk * rg_load8(f3 + x);
    }
    for (int64_t x = xv; x < cols; ++x) {
      t0 += pr[x] * rg_load1(f0[x]);
      t1 += pr[x] * rg_load1(f1[x]);
      t2 += pr[x] * rg_load1(f2[x]);
      t3 += pr[x] * rg_load1(f3[x]);
    }
  }
  out[0] = rg_hsum8(a0) + t0;
  out[1] = rg_hsum8(a1) + t1;
  out[2] = rg_hsum8(a2) + t2;
  out[3] = rg_hsum8(a3) + t3;
}
RGPT4D_CPU_CLONES static void rg_patch_dots4_f32(const float* p, int64_t sP, const float* const* planes, int64_t sH,
                                                 int64_t rows, int64_t cols, float* out) {
  rg_patch_dots4(p, sP, planes, sH, rows, cols, out);
}
RGPT4D_CPU_CLONES static void rg_patch_dots4_bf16(const float* p, int64_t sP, const uint16_t* const* planes,
                                                  int64_t sH, int64_t rows, int64_t cols, float* out) {
  rg_patch_dots4(p, sP, planes, sH, rows, cols, out);
}
#pragma GCC diagnostic pop

// plane[y, x] += coef * m[y, x] over the window (plane and m both with row stride W).
RGPT4D_CPU_CLONES static void rg_window_axpy_f32(float coef, const float* m, float* plane, int64_t W, RgWindow w) {
  for (int64_t y = w.y0; y < w.y1; ++y) {
    const float* mr = m + y * W;
    float* pr = plane + y * W;
    for (int64_t x = w.x0; x < w.x1; ++x) pr[x] += coef * mr[x];
  }
}

// One output row of a bilinear resize from source rows r0 (weight wy0) and r1 (wy1): column x reads
// elements lo[x] and hi[x] (offsets) of each row with weights wlo[x], whi[x].
RGPT4D_CPU_CLONES static void rg_resize_row_f32(const float* r0, const float* r1, float wy0, float wy1,
                                                const int64_t* lo, const int64_t* hi, const float* wlo,
                                                const float* whi, int64_t W, float* d) {
  for (int64_t x = 0; x < W; ++x)
    d[x] = wy0 * (wlo[x] * r0[lo[x]] + whi[x] * r0[hi[x]]) + wy1 * (wlo[x] * r1[lo[x]] + whi[x] * r1[hi[x]]);
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
