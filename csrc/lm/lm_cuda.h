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

// RMSNorm forward over N rows of D (x dtype xdt, weight wdt, y ydt = promote(x, w)): rstd[r]
// (accumulation dtype: float64 iff x is float64) and y = w * (x * rstd rounded to x's dtype).
cudaError_t rms_norm_fwd_launch(DType xdt, DType wdt, DType ydt, const void* x, const void* w, void* y, void* rstd,
                                int64_t N, int64_t D, double eps, cudaStream_t stream);
// RMSNorm grad_x: grad_y (gdt), x (xdt), w (wdt), rstd -> gx (xdt). grad_w is a reduction over
// rows, done by the binding.
cudaError_t rms_norm_bwd_launch(DType gdt, DType xdt, DType wdt, const void* gy, const void* x, const void* w,
                                const void* rstd, void* gx, int64_t N, int64_t D, cudaStream_t stream);
// SwiGLU over n elements of one dtype: y = silu(g) * u; backward: (dg, du) from grad.
cudaError_t swiglu_fwd_launch(DType dt, const void* g, const void* u, void* y, int64_t n, cudaStream_t stream);
cudaError_t swiglu_bwd_launch(DType dt, const void* gy, const void* g, const void* u, void* dg, void* du, int64_t n,
                              cudaStream_t stream);

// RoPE over x [B, H, L, D] (element strides xs / os for the first three dims; the last is
// contiguous), cos/sin [Bc, L, D] contiguous (Bc = 1 or B), all of dtype dt:
// o = x * cos + rotate_half(x) * sin, or its transpose (backward).
struct RopeShape {
  int64_t B, H, L, D, Bc;
  int64_t xs[3], os[3];
};
cudaError_t rope_launch(DType dt, const void* x, const void* cos, const void* sin, void* out, RopeShape shape,
                        bool backward, cudaStream_t stream);

}  // namespace cuda
}  // namespace rgpt4d
