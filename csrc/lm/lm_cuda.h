// Launcher of the fused linear + cross-entropy row kernel, over raw pointers (no torch types):
// lm_cuda.cpp binds it to tensors.
#pragma once

#include <cuda_runtime_api.h>

#include "common/hd.h"

namespace rgpt4d {
namespace cuda {

// R rows of V logits (dtype xdt, contiguous), targets [R] (int64, all in [0, V)): row_loss[r]
// (float64) = logsumexp(x_r) - x_{r, t_r}; when write_grad, x_r <- scale * (softmax(x_r) -
// onehot(t_r)). Arithmetic in float32 (float64 for float64 logits).
cudaError_t lce_rows_launch(DType xdt, void* logits, const int64_t* target, int64_t R, int64_t V, double scale,
                            bool write_grad, double* row_loss, cudaStream_t stream);

}  // namespace cuda
}  // namespace rgpt4d
