// Raw-pointer loops of the P4D loss CPU kernels. The loss/gradient loop over a block of floats
// is instantiated per (kind, mask, chain, grad) and compiled twice (RGPT4D_CPU_CLONES: an AVX2
// clone chosen at load time and a baseline one); GCC vectorises the branch-free body.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/hd.h"
#include "p4d/p4d_math.h"

#if defined(__GNUC__)
#define RGPT4D_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RGPT4D_ALWAYS_INLINE inline
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
RGPT4D_ALWAYS_INLINE void p4d_elem_loop(const float* p, const float* t, const uint8_t* m, const float* chain,
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
RGPT4D_ALWAYS_INLINE float p4d_block_body(const float* p, const float* t, const uint8_t* m, const float* chain,
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
RGPT4D_ALWAYS_INLINE float p4d_block_kind(const float* p, const float* t, const uint8_t* m, const float* chain,
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

// bf16 <-> float rows (the same conversions as the TPE loops, kept local to this family).
RGPT4D_CPU_CLONES static void p4d_load_bf16(const uint16_t* x, float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = bf16_bits_to_float(x[i]);
}
RGPT4D_CPU_CLONES static void p4d_store_bf16(const float* v, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16_bits(v[i]);
}

}  // namespace cpu
}  // namespace rgpt4d
