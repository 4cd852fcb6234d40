// Raw-pointer building blocks of the CPU attention kernel (attn.cpp): a register-tiled GEMM on
// packed, padded row-major panels, and the row pieces of the softmax. Written with GCC vector
// extensions (32-byte vectors: 8 floats or 4 doubles), so the code generated does not depend on
// what the auto-vectoriser makes of it; the float entry points have an AVX2+FMA clone chosen at
// load time (RGPT4D_CPU_CLONES; the baseline clone runs the same vectors as SSE pairs).
//
// float rows use a vector exp (cephes_exp_parts of cpu/exp.h, ~1 ulp, exactly 0
// below -87.3); double rows (the float64 path, for gradcheck) use std::exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/runtime.h"

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors in inline helpers: never an ABI boundary
#endif

namespace rgpt4d {
namespace cpu {

// Panel padding: GEMM rows come in tiles of kAttnTileM, columns in tiles of kAttnTileN.
constexpr int64_t kAttnTileM = 4;
constexpr int64_t kAttnTileN = 16;

inline int64_t attn_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename A>
struct AttnVec {
  typedef A type __attribute__((vector_size(32), aligned(alignof(A))));
  static constexpr int kLanes = 32 / sizeof(A);
  static constexpr int kPerTile = kAttnTileN / kLanes;  // vectors per tile row
};

template <typename A>
RGPT4D_CPU_INLINE typename AttnVec<A>::type attn_load(const A* p) {
  typename AttnVec<A>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename A>
RGPT4D_CPU_INLINE void attn_store(A* p, typename AttnVec<A>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// C[m x n] = (accumulate ? C : 0) + A[m x k] B[k x n]; row-major with leading dimensions lda, ldb,
// ldc; m a multiple of kAttnTileM and n of kAttnTileN (the callers pad their panels with zeros).
// Each 4 x 16 tile of C stays in registers over the whole k loop; the summation order is fixed.
template <typename A>
RGPT4D_CPU_INLINE void attn_gemm_t(const A* a, int64_t lda, const A* b, int64_t ldb, A* c, int64_t ldc, int64_t m,
                                    int64_t n, int64_t k, bool accumulate) {
  using V = typename AttnVec<A>::type;
  constexpr int L = AttnVec<A>::kLanes, P = AttnVec<A>::kPerTile;
  for (int64_t i = 0; i < m; i += kAttnTileM) {
    const A* a0 = a + i * lda;
    const A* a1 = a0 + lda;
    const A* a2 = a1 + lda;
    const A* a3 = a2 + lda;
    for (int64_t j = 0; j < n; j += kAttnTileN) {
      V acc[4][P];
      A* ct = c + i * ldc + j;
      for (int r = 0; r < 4; ++r)
        for (int v = 0; v < P; ++v) acc[r][v] = accumulate ? attn_load(ct + r * ldc + v * L) : V{};
      const A* bp = b + j;
      for (int64_t p = 0; p < k; ++p, bp += ldb) {
        V bv[P];
        for (int v = 0; v < P; ++v) bv[v] = attn_load(bp + v * L);
        const A x0 = a0[p], x1 = a1[p], x2 = a2[p], x3 = a3[p];
        for (int v = 0; v < P; ++v) {
          acc[0][v] += x0 * bv[v];
          acc[1][v] += x1 * bv[v];
          acc[2][v] += x2 * bv[v];
          acc[3][v] += x3 * bv[v];
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int v = 0; v < P; ++v) attn_store(ct + r * ldc + v * L, acc[r][v]);
    }
  }
}

// exp(x) for x <= 0 (or -inf), 8 lanes: 0 below -87.3 (where expf is subnormal), NaN stays NaN.
typedef int32_t AttnI8 __attribute__((vector_size(32), aligned(4)));
RGPT4D_CPU_INLINE AttnVec<float>::type attn_exp_nonpos_f8(AttnVec<float>::type x) {
  using V = AttnVec<float>::type;
  const V lo = V{} + -87.3365f;
  const AttnI8 under = x < lo;
  x = under ? lo : x;
  V fx;
  const V y = cephes_exp_parts(x, fx);
  const AttnI8 bits = (__builtin_convertvector(fx, AttnI8) + 127) << 23;
  V pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  return under ? V{} : y * pow2;
}

// ---- float rows (n a multiple of kAttnTileN) --------------------------------------------------

// max over x[0, n); -inf when every element is -inf (NaNs are skipped here and caught by the exp).
RGPT4D_CPU_CLONES static float attn_row_max_f32(const float* x, int64_t n) {
  using V = AttnVec<float>::type;
  V m0 = V{} - std::numeric_limits<float>::infinity(), m1 = m0;
  for (int64_t j = 0; j < n; j += 16) {
    const V a = attn_load(x + j), b = attn_load(x + j + 8);
    m0 = a > m0 ? a : m0;
    m1 = b > m1 ? b : m1;
  }
  m0 = m1 > m0 ? m1 : m0;
  float r = m0[0];
  for (int l = 1; l < 8; ++l) r = m0[l] > r ? m0[l] : r;
  return r;
}

// x[j] <- exp(x[j] - sub) (sub finite, or +inf: all zeros); returns the sum (fixed order).
RGPT4D_CPU_CLONES static float attn_row_exp_sum_f32(float* x, int64_t n, float sub) {
  using V = AttnVec<float>::type;
  V s0{}, s1{};
  for (int64_t j = 0; j < n; j += 16) {
    const V a = attn_exp_nonpos_f8(attn_load(x + j) - sub), b = attn_exp_nonpos_f8(attn_load(x + j + 8) - sub);
    attn_store(x + j, a);
    attn_store(x + j + 8, b);
    s0 += a;
    s1 += b;
  }
  s0 += s1;
  return ((s0[0] + s0[1]) + (s0[2] + s0[3])) + ((s0[4] + s0[5]) + (s0[6] + s0[7]));
}

// x[j] <- exp(x[j] - sub[j]) (a row of the transposed scores: one log-sum-exp per column).
RGPT4D_CPU_CLONES static void attn_row_exp_cols_f32(float* x, const float* sub, int64_t n) {
  for (int64_t j = 0; j < n; j += 8) attn_store(x + j, attn_exp_nonpos_f8(attn_load(x + j) - attn_load(sub + j)));
}

// p[j] <- p[j] * (dp[j] - delta): the softmax backward (dS = P o (dP - rowsum(dO o O))).
RGPT4D_CPU_CLONES static void attn_row_ds_f32(float* p, const float* dp, float delta, int64_t n) {
  for (int64_t j = 0; j < n; ++j) p[j] = p[j] * (dp[j] - delta);
}

RGPT4D_CPU_CLONES static void attn_row_ds_cols_f32(float* p, const float* dp, const float* delta, int64_t n) {
  for (int64_t j = 0; j < n; ++j) p[j] = p[j] * (dp[j] - delta[j]);
}

RGPT4D_CPU_CLONES static void attn_gemm_f32(const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                                            int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate) {
  attn_gemm_t<float>(a, lda, b, ldb, c, ldc, m, n, k, accumulate);
}

// ---- double rows (the float64 path): plain loops, std::exp ------------------------------------

static inline double attn_row_max_f64(const double* x, int64_t n) {
  double r = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) r = x[j] > r ? x[j] : r;
  return r;
}

static inline double attn_row_exp_sum_f64(double* x, int64_t n, double sub) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - sub);
    s += x[j];
  }
  return s;
}

static inline void attn_row_exp_cols_f64(double* x, const double* sub, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - sub[j]);
}

static inline void attn_row_ds_f64(double* p, const double* dp, double delta, int64_t n) {
  for (int64_t j = 0; j < n; ++j) p[j] = p[j] * (dp[j] - delta);
}

static inline void attn_row_ds_cols_f64(double* p, const double* dp, const double* delta, int64_t n) {
  for (int64_t j = 0; j < n; ++j) p[j] = p[j] * (dp[j] - delta[j]);
}

static void attn_gemm_f64(const double* a, int64_t lda, const double* b, int64_t ldb, double* c, int64_t ldc,
                          int64_t m, int64_t n, int64_t k, bool accumulate) {
  attn_gemm_t<double>(a, lda, b, ldb, c, ldc, m, n, k, accumulate);
}

// Overloads the templated kernel picks from.
inline float attn_row_max(const float* x, int64_t n) { return attn_row_max_f32(x, n); }
inline double attn_row_max(const double* x, int64_t n) { return attn_row_max_f64(x, n); }
inline float attn_row_exp_sum(float* x, int64_t n, float sub) { return attn_row_exp_sum_f32(x, n, sub); }
inline double attn_row_exp_sum(double* x, int64_t n, double sub) { return attn_row_exp_sum_f64(x, n, sub); }
inline void attn_row_exp_cols(float* x, const float* sub, int64_t n) { attn_row_exp_cols_f32(x, sub, n); }
inline void attn_row_exp_cols(double* x, const double* sub, int64_t n) { attn_row_exp_cols_f64(x, sub, n); }
inline void attn_row_ds(float* p, const float* dp, float d, int64_t n) { attn_row_ds_f32(p, dp, d, n); }
inline void attn_row_ds(double* p, const double* dp, double d, int64_t n) { attn_row_ds_f64(p, dp, d, n); }
inline void attn_row_ds_cols(float* p, const float* dp, const float* d, int64_t n) { attn_row_ds_cols_f32(p, dp, d, n); }
inline void attn_row_ds_cols(double* p, const double* dp, const double* d, int64_t n) {
  attn_row_ds_cols_f64(p, dp, d, n);
}
inline void attn_gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
                      int64_t n, int64_t k, bool accumulate) {
  attn_gemm_f32(a, lda, b, ldb, c, ldc, m, n, k, accumulate);
}
inline void attn_gemm(const double* a, int64_t lda, const double* b, int64_t ldb, double* c, int64_t ldc, int64_t m,
                      int64_t n, int64_t k, bool accumulate) {
  attn_gemm_f64(a, lda, b, ldb, c, ldc, m, n, k, accumulate);
}

}  // namespace cpu
}  // namespace rgpt4d

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
