// Launchers of the P4D loss CUDA kernels, over raw pointers (no torch types): p4d_cuda.cpp binds
// them to tensors.
#pragma once

#include <cuda_runtime_api.h>

#include "common/hd.h"
#include "p4d/p4d_math.h"

namespace rgpt4d {
namespace cuda {

// One term of the multi-tensor launch (p4d_loss). Element e of the term is valid iff
// !(flags & kP4DFlagMask) || mask[(e / inner) % period].
struct P4DTermDesc {
  const void* pred;
  const void* target;
  const uint8_t* mask;  // bool bytes, or null
  void* grad;           // pred's dtype, or null
  int64_t numel, inner, period;
  int64_t first_block;  // the term's first block in the global block numbering
  double beta, grad_factor;
  int kind, flags;
  int index;            // the term's position in counts / losses
};

// Terms per launch: the table travels as a kernel parameter (a few hundred bytes).
constexpr int kP4DMaxTermsPerLaunch = 8;

struct P4DTermTable {
  int n;
  P4DTermDesc t[kP4DMaxTermsPerLaunch];
};

// Elements per block of the multi-tensor kernel (256 threads x 16).
constexpr int64_t kP4DTile = 4096;

// Blocks [block0, block0 + nblocks) of the terms in `table` (all with pred dtype pdt and target
// dtype tdt; float64 arithmetic iff both are float64, else float32): the per-element loss and
// gradient; each block writes its loss sum to partial[block] (float64).
cudaError_t p4d_terms_launch(DType pdt, DType tdt, const P4DTermTable& table, int64_t block0, int64_t nblocks,
                             const int64_t* counts, bool mean, double log_eps, double* partial, cudaStream_t stream);

// One block: losses[i] = sum of partial[ranges[2i] .. ranges[2i+1]) in a fixed order, divided by
// counts[i] when mean (0 when counts[i] == 0); total = sum_i weights[i] * losses[i].
// out_double: losses/total are float64, else float32.
cudaError_t p4d_finalize_launch(const double* partial, const int64_t* ranges, const int64_t* counts,
                                const double* weights, int n, bool mean, bool out_double, void* losses, void* total,
                                cudaStream_t stream);

// The fused linear loss's elementwise part over R rows of D: row_loss[r] (float64) = the row's
// loss sum; when write_grad, y[r] <- scale[0] * row_scale[r] * loss'(y - target) (masked rows:
// loss 0, gradient 0). scale / row_scale hold the accumulation type (float64 iff y and target
// are float64); row_scale and mask may be null.
cudaError_t p4d_rows_launch(DType ydt, DType tdt, void* y, const void* target, const uint8_t* mask,
                            const void* row_scale, const void* scale, int64_t R, int64_t D, int kind, double beta,
                            bool write_grad, double* row_loss, cudaStream_t stream);

}  // namespace cuda
}  // namespace rgpt4d
