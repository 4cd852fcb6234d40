// Launchers of the TPE CUDA kernels, over raw pointers (no torch types): tpe_cuda.cpp binds
// them to tensors. Pointers named *_acc hold the accumulation type: double when dt is
// kFloat64, float otherwise.
#pragma once

#include <cuda_runtime_api.h>

#include "common/hd.h"
#include "tpe/tpe_math.h"

namespace rgpt4d {
namespace cuda {

// The per-frame encoding: a table row (learned) or the sinusoid of a time in seconds.
struct EncArgs {
  const void* table_acc;   // [L, D] or null
  const int64_t* rows;     // [BT] table rows (learned)
  const void* seconds_acc; // [BT] seconds (sinusoidal)
  int64_t D;
  double log_base;
};

// The most bytes of a frame's encoding (D values of the accumulation type) that the kernels caching
// it in dynamic shared memory (tpe_add, the downsample + LayerNorm forward and input gradient) can
// take on the current device: its opt-in shared memory per block less the largest static shared
// array of those kernels (the LayerNorm block-reduction scratch). The launchers opt in past the
// 48 KiB a launch gets by default when a D needs it.
int64_t tpe_max_encoding_bytes(DType dt);

cudaError_t tpe_add_launch(DType dt, const void* x, void* out, EncArgs enc, int64_t BT, int64_t N,
                           cudaStream_t stream);

// grad [BT, N, D] -> out_acc [L, D] (zero-initialised). Deterministic: per-frame sums into
// partial_acc [BT, D], then an ordered scatter. Otherwise float atomics into out.
cudaError_t tpe_table_grad_launch(DType dt, const void* grad, const int64_t* rows, void* partial_acc, void* out_acc,
                                  int64_t BT, int64_t N, int64_t D, bool deterministic, cudaStream_t stream);

cudaError_t tpe_ds_ln_fwd_launch(DType dt, const void* x, EncArgs enc, const void* weight_acc, const void* bias_acc,
                                 void* out, void* mean_acc, void* rstd_acc, DsGeom geo, int64_t BT, double eps,
                                 cudaStream_t stream);

// grad_x (x's dtype) when need_x; weight/bias partial sums [row_splits, K] (acc) when given.
cudaError_t tpe_ds_ln_bwd_launch(DType dt, const void* grad_out, const void* x, EncArgs enc, const void* weight_acc,
                                 const void* mean_acc, const void* rstd_acc, void* grad_x, void* part_w_acc,
                                 void* part_b_acc, int64_t row_splits, DsGeom geo, int64_t BT, cudaStream_t stream);

}  // namespace cuda
}  // namespace rgpt4d
