// Launcher of the pixel-shuffle gather/scatter (heads_cuda.cpp binds it to tensors). No torch types.
#pragma once

#include <cuda_runtime_api.h>

#include "common/hd.h"

namespace rgpt4d {
namespace cuda {

// big [N, C, H*r, W*r] contiguous, small [N, C*r*r, H, W] with element strides s[4]; forward:
// big <- shuffle(small); backward: small <- unshuffle(big). One thread per element.
cudaError_t pixel_shuffle_launch(DType dt, void* big, void* small, const int64_t* s, int64_t N, int64_t C, int64_t H,
                                 int64_t W, int64_t r, bool forward, cudaStream_t stream);

}  // namespace cuda
}  // namespace rgpt4d
