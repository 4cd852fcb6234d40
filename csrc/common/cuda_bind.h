// Host-side helpers for the *_cuda.cpp bindings (tensors -> raw-pointer launchers): the torch
// dtype -> kernel element type map and the launch-error check. Included only by .cpp files.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include "common/hd.h"

namespace rgpt4d {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "rgpt4d CUDA kernels support float32/float64/bfloat16/float16, got ", t);
  }
}

inline void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace rgpt4d
