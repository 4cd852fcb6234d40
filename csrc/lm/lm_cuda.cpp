// CUDA binding of the fused linear + cross-entropy op: tensors -> raw pointers -> the row kernel
// in lm_cuda_kernels.cu. The checks and the chunk driver are shared with the CPU binding
// (lm_common.h). Selecting the non-ignored rows (nonzero) and the target range check read their
// sizes on the host: one synchronisation per call.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_bind.h"
#include "lm/lm_common.h"
#include "lm/lm_cuda.h"

namespace rgpt4d {
namespace {

at::Tensor empty_cuda(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }

void lce_rows_cuda(at::Tensor logits, const at::Tensor& target, double scale, bool write_grad, at::Tensor row_loss) {
  const int64_t R = logits.size(0), V = logits.size(1);
  if (R == 0) return;
  TORCH_CHECK(logits.is_contiguous() && target.is_contiguous() && row_loss.is_contiguous(),
              "fused_linear_cross_entropy: internal: chunk tensors must be contiguous");
  check_cuda(cuda::lce_rows_launch(to_dtype(logits.scalar_type()), logits.data_ptr(), target.data_ptr<int64_t>(), R,
                                   V, scale, write_grad, row_loss.data_ptr<double>(),
                                   c10::cuda::getCurrentCUDAStream()),
             "fused_linear_cross_entropy");
}

const LceHostOps kCudaOps{&empty_cuda, &lce_rows_cuda};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cuda(
    const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& target,
    int64_t ignore_index, int64_t reduction, int64_t chunk_size, bool need_h_grad, bool need_w_grad,
    bool need_b_grad) {
  c10::cuda::CUDAGuard guard(h.device());
  const LceArgs a = lce_args(h, weight, bias, target, ignore_index, chunk_size);
  return lce_forward_driver(a, reduction, need_h_grad, need_w_grad, need_b_grad, kCudaOps);
}

}  // namespace

TORCH_LIBRARY_IMPL(rgpt4d, CUDA, m) { m.impl("linear_cross_entropy", &linear_cross_entropy_cuda); }

}  // namespace rgpt4d
