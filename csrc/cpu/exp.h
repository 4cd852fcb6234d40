// The exp polynomial shared by the CPU kernels' vectorised loops (lm_cpu_loops.h, attn_cpu_loops.h).
#pragma once

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // vector instantiations are always inlined, never an ABI boundary
#endif

namespace rgpt4d {
namespace cpu {

// Cephes-style exp for x in [-87, 0] (~1 ulp): fx = round(x / ln 2) and y = exp(x - fx ln 2), so
// exp(x) = y * 2^fx. Written for a float or a GCC vector of floats (attn_cpu_loops.h).
template <typename V>
static inline V cephes_exp_parts(V x, V& fx) {
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (no floor call: keeps the loops vectorisable)
  fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  const V z = x * x;
  V y = V{} + 1.9875691500E-4f;
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  return y * z + x + 1.0f;
}

}  // namespace cpu
}  // namespace rgpt4d

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
