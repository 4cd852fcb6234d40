// Small helpers shared by host (C++) and device (CUDA) code. No torch headers here, so .cu
// files that include this stay quick to compile.
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__)
#define RGPT4D_HD __host__ __device__ __forceinline__
#else
#define RGPT4D_HD inline
#endif

// Multi-versioned hot loops on x86-64 with GCC: one AVX2+FMA clone and a baseline clone,
// chosen at load time, so the wheel runs on any x86-64 CPU and vectorises where it can.
#if !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RGPT4D_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RGPT4D_CPU_CLONES
#endif

#if !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
namespace rgpt4d {
// Whether this CPU runs the hand-written AVX2 loops (target("avx2") functions): read once.
inline bool cpu_has_avx2() {
  static const bool v = __builtin_cpu_supports("avx2");
  return v;
}
}  // namespace rgpt4d
#endif

namespace rgpt4d {

// Element types the kernels are compiled for; the tensor bindings map torch dtypes onto these.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

RGPT4D_HD float bf16_bits_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even; NaN stays a (quiet) NaN.
RGPT4D_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return is_nan ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(rounded);
}

}  // namespace rgpt4d
