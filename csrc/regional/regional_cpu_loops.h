// Raw-pointer channel loops of the regional CPU kernels. Plain loops the compiler auto-vectorises;
// each has an AVX2 clone chosen at load time (RGPT4D_CPU_CLONES). float32 and bf16 rows; other
// dtypes go through the generic templates in regional.cpp.
#pragma once

#include "cpu/runtime.h"

namespace rgpt4d {
namespace cpu {

// acc += a * x
RGPT4D_CPU_CLONES static void rg_axpy_f32(float a, const float* x, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a * x[i];
}
RGPT4D_CPU_CLONES static void rg_axpy_bf16(float a, const uint16_t* x, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a * bf16_bits_to_float(x[i]);
}

// sum(a * x) in lane8_sum's fixed order (bf16 x; float x: cpu::dot_f32).
RGPT4D_CPU_CLONES static float rg_dot_bf16(const float* a, const uint16_t* x, int64_t n) {
  return lane8_sum(n, [&](int64_t i) { return a[i] * bf16_bits_to_float(x[i]); });
}

// sum(w[t] * base[off[t]]): one output cell of a planar map from its flattened 2D taps.
RGPT4D_CPU_CLONES static float rg_gather_dot_f32(const float* base, const int64_t* off, const float* w, int64_t n) {
  return lane8_sum(n, [&](int64_t i) { return w[i] * base[off[i]]; });
}
RGPT4D_CPU_CLONES static float rg_gather_dot_bf16(const uint16_t* base, const int64_t* off, const float* w, int64_t n) {
  return lane8_sum(n, [&](int64_t i) { return w[i] * bf16_bits_to_float(base[off[i]]); });
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
// acc[c] += sum_{a < ny} sum_{b < nx} (wy[a] * yscale * wx[b]) * base[yidx[a] * ys + xidx[b] * xs + c], c < len:
// one output cell of RoIAlign over channels-last pixels (a pixel's channels contiguous). The cell's
// taps run with 32 channels in four vector accumulators (then 8, then one by one), so the
// accumulator is loaded and stored once per cell instead of once per tap. Each element adds its
// taps in the same order (y, then x) whatever the split, so the result does not depend on len.
template <typename S>
__attribute__((always_inline)) inline void rg_cell_taps(const S* base, const int64_t* yidx, int64_t ys, const float* wy,
                                                        float yscale, int64_t ny, const int64_t* xidx, int64_t xs,
                                                        const float* wx, int64_t nx, int64_t len, float* acc) {
  int64_t c = 0;
  for (; c + 32 <= len; c += 32) {
    RgF8 a0 = rg_load8(acc + c), a1 = rg_load8(acc + c + 8), a2 = rg_load8(acc + c + 16), a3 = rg_load8(acc + c + 24);
    for (int64_t a = 0; a < ny; ++a) {
      const S* row = base + yidx[a] * ys + c;
      const float wa = wy[a] * yscale;
      for (int64_t b = 0; b < nx; ++b) {
        const float w = wa * wx[b];
        const RgF8 wv = {w, w, w, w, w, w, w, w};
        const S* p = row + xidx[b] * xs;
        a0 += wv * rg_load8(p);
        a1 += wv * rg_load8(p + 8);
        a2 += wv * rg_load8(p + 16);
        a3 += wv * rg_load8(p + 24);
      }
    }
    memcpy(acc + c, &a0, sizeof(a0));
    memcpy(acc + c + 8, &a1, sizeof(a1));
    memcpy(acc + c + 16, &a2, sizeof(a2));
    memcpy(acc + c + 24, &a3, sizeof(a3));
  }
  for (; c + 8 <= len; c += 8) {
    RgF8 a0 = rg_load8(acc + c);
    for (int64_t a = 0; a < ny; ++a) {
      const S* row = base + yidx[a] * ys + c;
      const float wa = wy[a] * yscale;
      for (int64_t b = 0; b < nx; ++b) {
        const float w = wa * wx[b];
        const RgF8 wv = {w, w, w, w, w, w, w, w};
        a0 += wv * rg_load8(row + xidx[b] * xs);
      }
    }
    memcpy(acc + c, &a0, sizeof(a0));
  }
  for (; c < len; ++c) {
    float s = acc[c];
    for (int64_t a = 0; a < ny; ++a) {
      const float wa = wy[a] * yscale;
      for (int64_t b = 0; b < nx; ++b) s += (wa * wx[b]) * rg_load1(base[yidx[a] * ys + xidx[b] * xs + c]);
    }
    acc[c] = s;
  }
}
RGPT4D_CPU_CLONES static void rg_cell_taps_f32(const float* base, const int64_t* yidx, int64_t ys, const float* wy,
                                               float yscale, int64_t ny, const int64_t* xidx, int64_t xs,
                                               const float* wx, int64_t nx, int64_t len, float* acc) {
  rg_cell_taps(base, yidx, ys, wy, yscale, ny, xidx, xs, wx, nx, len, acc);
}
RGPT4D_CPU_CLONES static void rg_cell_taps_bf16(const uint16_t* base, const int64_t* yidx, int64_t ys, const float* wy,
                                                float yscale, int64_t ny, const int64_t* xidx, int64_t xs,
                                                const float* wx, int64_t nx, int64_t len, float* acc) {
  rg_cell_taps(base, yidx, ys, wy, yscale, ny, xidx, xs, wx, nx, len, acc);
}

// One band row of the banded RoIAlign: for each of the pw output cells j, acc[j * len + c] +=
// sum over the cell's x-taps b in [xstart[j], xstart[j + 1]) of (wy * wx[b]) * row[xidx[b] * len + c]
// (row: one channels-last row of the band, len channels per pixel).
template <typename S>
__attribute__((always_inline)) inline void rg_band_row(const S* row, float wy, const int64_t* xstart, const int64_t* xidx,
                                                       const float* wx, int64_t pw, int64_t len, float* acc) {
  static const int64_t zero = 0;
  for (int64_t j = 0; j < pw; ++j)
    rg_cell_taps(row, &zero, 0, &wy, 1.0f, 1, xidx + xstart[j], len, wx + xstart[j], xstart[j + 1] - xstart[j], len,
                 acc + j * len);
}
RGPT4D_CPU_CLONES static void rg_band_row_f32(const float* row, float wy, const int64_t* xstart, const int64_t* xidx,
                                              const float* wx, int64_t pw, int64_t len, float* acc) {
  rg_band_row(row, wy, xstart, xidx, wx, pw, len, acc);
}

// dst[(r * W + x) * len + c] = src[c * sC + r * sH + x] for r < rows, x < W, c < len: a channel slice
// of planar rows transposed to channels-last (float), 8 x 8 blocks through registers.
__attribute__((always_inline)) inline void rg_transpose8_regs(const RgF8* r, RgF8* o) {
  typedef int32_t RgI8 __attribute__((vector_size(32)));
  const RgI8 lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const RgI8 s0 = {0, 1, 8, 9, 4, 5, 12, 13}, s1 = {2, 3, 10, 11, 6, 7, 14, 15};
  const RgI8 h0 = {0, 1, 2, 3, 8, 9, 10, 11}, h1 = {4, 5, 6, 7, 12, 13, 14, 15};
  const RgF8 t0 = __builtin_shuffle(r[0], r[1], lo), t1 = __builtin_shuffle(r[0], r[1], hi);
  const RgF8 t2 = __builtin_shuffle(r[2], r[3], lo), t3 = __builtin_shuffle(r[2], r[3], hi);
  const RgF8 t4 = __builtin_shuffle(r[4], r[5], lo), t5 = __builtin_shuffle(r[4], r[5], hi);
  const RgF8 t6 = __builtin_shuffle(r[6], r[7], lo), t7 = __builtin_shuffle(r[6], r[7], hi);
  const RgF8 u0 = __builtin_shuffle(t0, t2, s0), u1 = __builtin_shuffle(t0, t2, s1);
  const RgF8 u2 = __builtin_shuffle(t1, t3, s0), u3 = __builtin_shuffle(t1, t3, s1);
  const RgF8 u4 = __builtin_shuffle(t4, t6, s0), u5 = __builtin_shuffle(t4, t6, s1);
  const RgF8 u6 = __builtin_shuffle(t5, t7, s0), u7 = __builtin_shuffle(t5, t7, s1);
  o[0] = __builtin_shuffle(u0, u4, h0);
  o[1] = __builtin_shuffle(u1, u5, h0);
  o[2] = __builtin_shuffle(u2, u6, h0);
  o[3] = __builtin_shuffle(u3, u7, h0);
  o[4] = __builtin_shuffle(u0, u4, h1);
  o[5] = __builtin_shuffle(u1, u5, h1);
  o[6] = __builtin_shuffle(u2, u6, h1);
  o[7] = __builtin_shuffle(u3, u7, h1);
}
// dst[k * ld .. + 8] = column k of the 8 x 8 block r (r[j][k] for j < 8).
__attribute__((always_inline)) inline void rg_transpose8(const RgF8* r, float* dst, int64_t ld) {
  RgF8 o[8];
  rg_transpose8_regs(r, o);
  for (int k = 0; k < 8; ++k) memcpy(dst + k * ld, &o[k], sizeof(RgF8));
}
template <typename S>
__attribute__((always_inline)) inline void rg_transpose_band(const S* src, int64_t sC, int64_t sH, int64_t rows,
                                                             int64_t W, int64_t len, float* dst) {
  const int64_t cv = len / 8 * 8, xv = W / 8 * 8;
  for (int64_t r = 0; r < rows; ++r) {
    const S* s = src + r * sH;
    float* d = dst + r * W * len;
    for (int64_t c = 0; c < cv; c += 8) {
      for (int64_t x = 0; x < xv; x += 8) {
        RgF8 v[8];
        for (int k = 0; k < 8; ++k) v[k] = rg_load8(s + (c + k) * sC + x);
        rg_transpose8(v, d + x * len + c, len);
      }
      for (int64_t x = xv; x < W; ++x)
        for (int64_t k = 0; k < 8; ++k) d[x * len + c + k] = rg_load1(s[(c + k) * sC + x]);
    }
    for (int64_t c = cv; c < len; ++c)
      for (int64_t x = 0; x < W; ++x) d[x * len + c] = rg_load1(s[c * sC + x]);
  }
}
RGPT4D_CPU_CLONES static void rg_transpose_band_f32(const float* src, int64_t sC, int64_t sH, int64_t rows, int64_t W,
                                                    int64_t len, float* dst) {
  rg_transpose_band(src, sC, sH, rows, W, len, dst);
}
// o[c * P + q] = a[q * len + c] + (e ? e[c] : 0) for q < P, c < len: pooled cells (channels
// innermost) to the output's [C, ph, pw] layout, 8 x 8 blocks through registers.
RGPT4D_CPU_CLONES static void rg_cells_to_planar_f32(const float* a, int64_t P, int64_t len, const float* e, float* o) {
  const int64_t cv = len / 8 * 8, qv = P / 8 * 8;
  for (int64_t c = 0; c < cv; c += 8) {
    for (int64_t q = 0; q < qv; q += 8) {
      RgF8 v[8], t[8];
      for (int k = 0; k < 8; ++k) v[k] = rg_load8(a + (q + k) * len + c);
      rg_transpose8_regs(v, t);
      for (int k = 0; k < 8; ++k) {
        const float ek = e ? e[c + k] : 0.0f;
        const RgF8 ev = {ek, ek, ek, ek, ek, ek, ek, ek};
        const RgF8 y = t[k] + ev;
        memcpy(o + (c + k) * P + q, &y, sizeof(y));
      }
    }
    for (int64_t k = 0; k < 8; ++k)
      for (int64_t q = qv; q < P; ++q) o[(c + k) * P + q] = a[q * len + c + k] + (e ? e[c + k] : 0.0f);
  }
  for (int64_t c = cv; c < len; ++c)
    for (int64_t q = 0; q < P; ++q) o[c * P + q] = a[q * len + c] + (e ? e[c] : 0.0f);
}
RGPT4D_CPU_CLONES static void rg_transpose_band_bf16(const uint16_t* src, int64_t sC, int64_t sH, int64_t rows,
                                                     int64_t W, int64_t len, float* dst) {
  rg_transpose_band(src, sC, sH, rows, W, len, dst);
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
