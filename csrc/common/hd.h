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
