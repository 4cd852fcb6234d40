// Raw-pointer loops of the P4D loss CPU kernels. The loss/gradient loop over a block of floats
// is instantiated per (kind, mask, chain, grad) and compiled twice (RGPT4D_CPU_CLONES: an AVX2
// clone chosen at load time and a baseline one); GCC vectorises the branch-free body.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "cpu/runtime.h"
#include "p4d/p4d_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

namespace rgpt4d {
namespace cpu {

// Sum of the loss over n elements and, when g is given, g[i] = scale * chain[i] * loss'(d[i]).
// Masked-out elements (m[i] == 0) contribute 0 to both, even where p or t is NaN/inf.
// g may alias p (the fused linear loss writes the gradient over the projection).
// The elementwise loop has no reduction, so GCC vectorises it (the selects are bitwise,
// p4d_select); it writes the per-element loss to `l`, summed afterwards in a fixed order over
// eight lanes.
template <int KIND, bool MASK, bool CHAIN, bool GRAD>
RGPT4D_CPU_INLINE void p4d_elem_loop(const float* p, const float* t, const uint8_t* m, const float* chain,
                                        float* g, float* l, int64_t n, P4DConsts<float> c, float scale) {
  for (int64_t i = 0; i < n; ++i) {
    const float d = p[i] - t[i];
    const bool ok = !MASK || m[i] != 0;
    l[i] = p4d_select(ok, p4d_elem_loss<KIND, float>(d, c), 0.0f);
    if (GRAD) {
      float gr = p4d_elem_grad<KIND, float>(d, c) * scale;
      if (CHAIN) gr *= chain[i];
      g[i] = p4d_select(ok, gr, 0.0f);
    }
  }
}

// Elements per pass of the elementwise loop: its scratch `l` stays in L1 while p, t and g
// stream through. A multiple of 8.
constexpr int64_t kP4DSub = 1024;

// The loss of a block in passes of kP4DSub elements. Eight lane sums run across the passes (lane
// k adds the losses of elements 8j + k in order), then the lanes are added pairwise and the
// last few elements in order: a fixed order, the same in every clone and on any thread count.
template <int KIND, bool MASK, bool CHAIN, bool GRAD>
RGPT4D_CPU_INLINE float p4d_block_body(const float* p, const float* t, const uint8_t* m, const float* chain,
                                          float* g, float* l, int64_t n,
                                          P4DConsts<float> c, float scale) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i0 = 0, len = 0;
  for (; i0 < n; i0 += kP4DSub) {
    len = std::min(kP4DSub, n - i0);
    p4d_elem_loop<KIND, MASK, CHAIN, GRAD>(p + i0, t + i0, MASK ? m + i0 : m, CHAIN ? chain + i0 : chain,
                                           GRAD ? g + i0 : g, l, len, c, scale);
    for (int64_t i = 0; i + 8 <= len; i += 8)
      for (int k = 0; k < 8; ++k) acc[k] += l[i + k];
  }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (int64_t i = len & ~int64_t(7); i < len; ++i) s += l[i];  // the last pass's remainder
  return s;
}

template <int KIND>
RGPT4D_CPU_INLINE float p4d_block_kind(const float* p, const float* t, const uint8_t* m, const float* chain,
                                          float* g, float* l, int64_t n,
                                          P4DConsts<float> c, float scale) {
  const int sel = (m ? 4 : 0) | (chain ? 2 : 0) | (g ? 1 : 0);
#define RGPT4D_P4D_BODY(M, C, G) p4d_block_body<KIND, M, C, G>(p, t, m, chain, g, l, n, c, scale)
  switch (sel) {
    case 0: return RGPT4D_P4D_BODY(false, false, false);
    case 1: return RGPT4D_P4D_BODY(false, false, true);
    case 2: return RGPT4D_P4D_BODY(false, true, false);
    case 3: return RGPT4D_P4D_BODY(false, true, true);
    case 4: return RGPT4D_P4D_BODY(true, false, false);
    case 5: return RGPT4D_P4D_BODY(true, false, true);
    case 6: return RGPT4D_P4D_BODY(true, true, false);
    default: return RGPT4D_P4D_BODY(true, true, true);
  }
#undef RGPT4D_P4D_BODY
}

// m, chain, g may each be null (no mask / not in log space / no gradient wanted); l is scratch
// for kP4DSub floats.
RGPT4D_CPU_CLONES static float p4d_block_f32(int kind, const float* p, const float* t, const uint8_t* m,
                                             const float* chain, float* g, float* l, int64_t n,
                                             P4DConsts<float> c, float scale) {
  if (kind == kP4DSmoothL1) return p4d_block_kind<kP4DSmoothL1>(p, t, m, chain, g, l, n, c, scale);
  if (kind == kP4DMSE) return p4d_block_kind<kP4DMSE>(p, t, m, chain, g, l, n, c, scale);
  return p4d_block_kind<kP4DL1>(p, t, m, chain, g, l, n, c, scale);
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define RGPT4D_P4D_AVX2 1
#define RGPT4D_AVX2_INLINE inline __attribute__((always_inline, target("avx2")))

// The float block loop in AVX2 intrinsics, for x86-64 CPUs that have it (use_avx2 in p4d.cpp).
// GCC's vectorisation of the generic loop leaves two things on the table: the per-element losses
// make a round trip through the scratch `l` before they are summed, and the gradient can only be
// written with ordinary stores. Here the eight lane sums stay in a register, and with `stream`
// the gradient goes out with non-temporal stores: no read for ownership of every line it
// overwrites, a quarter less memory traffic for a call far larger than the caches (10-20% less
// time for the full P4D loss: benchmarks/bench_p4d_loss.py).
// Same operations, in the same order, as p4d_elem_loss / p4d_elem_grad (p4d_math.h) and the lane
// sums of p4d_block_body: results are bitwise those of the generic loop (a test checks). No FMA
// in the target, so GCC cannot contract a product and a sum (e.g. mse's d * d into the lane sums).

template <int KIND>
RGPT4D_AVX2_INLINE void p4d_avx2_elem(__m256 d, __m256 beta, __m256 half_beta, __m256 inv_beta, __m256& loss,
                                      __m256& grad) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f);
  const __m256 ad = _mm256_and_ps(d, abs_mask);
  if (KIND == kP4DSmoothL1) {
    const __m256 quad = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), d), d), inv_beta);
    loss = _mm256_blendv_ps(_mm256_sub_ps(ad, half_beta), quad, _mm256_cmp_ps(ad, beta, _CMP_LT_OQ));
    const __m256 x = _mm256_mul_ps(d, inv_beta);  // clamp(x, -1, 1); NaN stays NaN
    const __m256 hi = _mm256_blendv_ps(x, one, _mm256_cmp_ps(x, one, _CMP_GT_OQ));
    grad = _mm256_blendv_ps(hi, minus_one, _mm256_cmp_ps(x, minus_one, _CMP_LT_OQ));
  } else if (KIND == kP4DMSE) {
    loss = _mm256_mul_ps(d, d);
    grad = _mm256_mul_ps(_mm256_set1_ps(2.0f), d);
  } else {
    const __m256 zero = _mm256_setzero_ps();
    loss = ad;
    grad = _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(d, zero, _CMP_GT_OQ), one),
                         _mm256_and_ps(_mm256_cmp_ps(d, zero, _CMP_LT_OQ), one));
  }
}

template <int KIND, bool MASK, bool CHAIN, bool GRAD, bool STREAM>
__attribute__((target("avx2"))) float p4d_block_avx2_body(const float* p, const float* t, const uint8_t* m,
                                                              const float* chain, float* g, float* l, int64_t n,
                                                              P4DConsts<float> c, float scale) {
  const __m256 beta = _mm256_set1_ps(c.beta), half_beta = _mm256_set1_ps(c.half_beta);
  const __m256 inv_beta = _mm256_set1_ps(c.inv_beta), vscale = _mm256_set1_ps(scale);
  __m256 acc = _mm256_setzero_ps();
  const int64_t nv = n & ~int64_t(7);
  for (int64_t i = 0; i < nv; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(p + i), _mm256_loadu_ps(t + i));
    __m256 loss, grad;
    p4d_avx2_elem<KIND>(d, beta, half_beta, inv_beta, loss, grad);
    __m256 masked_out = _mm256_setzero_ps();
    if (MASK) {
      const __m256i mb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m + i)));
      masked_out = _mm256_castsi256_ps(_mm256_cmpeq_epi32(mb, _mm256_setzero_si256()));
      loss = _mm256_andnot_ps(masked_out, loss);
    }
    acc = _mm256_add_ps(acc, loss);
    if (GRAD) {
      grad = _mm256_mul_ps(grad, vscale);
      if (CHAIN) grad = _mm256_mul_ps(grad, _mm256_loadu_ps(chain + i));
      if (MASK) grad = _mm256_andnot_ps(masked_out, grad);
      if (STREAM) {
        _mm256_stream_ps(g + i, grad);
      } else {
        _mm256_storeu_ps(g + i, grad);
      }
    }
  }
  alignas(32) float a[8];
  _mm256_store_ps(a, acc);
  float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  if (nv < n) {  // the last few elements: the generic loop, summed in order
    p4d_elem_loop<KIND, MASK, CHAIN, GRAD>(p + nv, t + nv, MASK ? m + nv : m, CHAIN ? chain + nv : chain,
                                           GRAD ? g + nv : g, l, n - nv, c, scale);
    for (int64_t i = 0; i < n - nv; ++i) s += l[i];
  }
  return s;
}

template <int KIND>
float p4d_block_avx2_kind(const float* p, const float* t, const uint8_t* m, const float* chain, float* g, float* l,
                          int64_t n, P4DConsts<float> c, float scale, bool stream) {
  const int sel = (m ? 4 : 0) | (chain ? 2 : 0) | (g ? 1 : 0);
#define RGPT4D_P4D_AVX2_BODY(M, C, G, S) p4d_block_avx2_body<KIND, M, C, G, S>(p, t, m, chain, g, l, n, c, scale)
  if (stream && g) {
    switch (sel) {
      case 1: return RGPT4D_P4D_AVX2_BODY(false, false, true, true);
      case 3: return RGPT4D_P4D_AVX2_BODY(false, true, true, true);
      case 5: return RGPT4D_P4D_AVX2_BODY(true, false, true, true);
      default: return RGPT4D_P4D_AVX2_BODY(true, true, true, true);
    }
  }
  switch (sel) {
    case 0: return RGPT4D_P4D_AVX2_BODY(false, false, false, false);
    case 1: return RGPT4D_P4D_AVX2_BODY(false, false, true, false);
    case 2: return RGPT4D_P4D_AVX2_BODY(false, true, false, false);
    case 3: return RGPT4D_P4D_AVX2_BODY(false, true, true, false);
    case 4: return RGPT4D_P4D_AVX2_BODY(true, false, false, false);
    case 5: return RGPT4D_P4D_AVX2_BODY(true, false, true, false);
    case 6: return RGPT4D_P4D_AVX2_BODY(true, true, false, false);
    default: return RGPT4D_P4D_AVX2_BODY(true, true, true, false);
  }
#undef RGPT4D_P4D_AVX2_BODY
}

// Same contract as p4d_block_f32; stream: write the gradient with non-temporal stores (g must be
// 32-byte aligned; callers end with cpu::stream_fence() before the gradient is read elsewhere).
static float p4d_block_f32_avx2(int kind, const float* p, const float* t, const uint8_t* m, const float* chain,
                                float* g, float* l, int64_t n, P4DConsts<float> c, float scale, bool stream) {
  stream = stream && (reinterpret_cast<uintptr_t>(g) & 31) == 0;
  if (kind == kP4DSmoothL1) return p4d_block_avx2_kind<kP4DSmoothL1>(p, t, m, chain, g, l, n, c, scale, stream);
  if (kind == kP4DMSE) return p4d_block_avx2_kind<kP4DMSE>(p, t, m, chain, g, l, n, c, scale, stream);
  return p4d_block_avx2_kind<kP4DL1>(p, t, m, chain, g, l, n, c, scale, stream);
}

#endif  // RGPT4D_P4D_AVX2

// Number of nonzero bytes (bool masks). 32-bit partial counts per 2^20 bytes, so no overflow.
RGPT4D_CPU_CLONES static int64_t p4d_count_u8(const uint8_t* m, int64_t n) {
  int64_t total = 0;
  for (int64_t i0 = 0; i0 < n; i0 += (int64_t(1) << 20)) {
    const int64_t i1 = std::min<int64_t>(n, i0 + (int64_t(1) << 20));
    uint32_t c = 0;
    for (int64_t i = i0; i < i1; ++i) c += m[i] != 0;
    total += c;
  }
  return total;
}

}  // namespace cpu
}  // namespace rgpt4d
