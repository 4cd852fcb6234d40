// Device helpers shared by the CUDA kernels: dtype loads/stores with a float (or double)
// accumulator, block reductions, and the dtype switch. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/acc.h"
#include "common/hd.h"

namespace rgpt4d {
namespace cuda {


template <typename A, typename T> __device__ __forceinline__ A ld(const T* p) { return static_cast<A>(*p); }
template <> __device__ __forceinline__ float ld<float, __nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <> __device__ __forceinline__ float ld<float, __half>(const __half* p) { return __half2float(*p); }

template <typename T, typename A> __device__ __forceinline__ void st(T* p, A v) { *p = static_cast<T>(v); }
template <> __device__ __forceinline__ void st<__nv_bfloat16, float>(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ void st<__half, float>(__half* p, float v) { *p = __float2half_rn(v); }

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 values. Fixed reduction order: deterministic.
template <typename A> __device__ __forceinline__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A r = (lane < nwarps) ? scratch[lane] : A(0);
  return warp_sum(r);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace rgpt4d

// Runs the statement with scalar_t bound to the element type of `dt`.
#define RGPT4D_DISPATCH_DTYPE(dt, ...)                                    \
  switch (dt) {                                                           \
    case ::rgpt4d::DType::kFloat32: { using scalar_t = float; __VA_ARGS__; break; }          \
    case ::rgpt4d::DType::kFloat64: { using scalar_t = double; __VA_ARGS__; break; }         \
    case ::rgpt4d::DType::kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; } \
    case ::rgpt4d::DType::kFloat16: { using scalar_t = __half; __VA_ARGS__; break; }         \
  }
