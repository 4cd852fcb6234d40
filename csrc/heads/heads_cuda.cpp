// CUDA binding of pixel_shuffle_act (CPU kernels in heads.cpp, schema in rgpt4d/ops/heads.py): the shuffle in
// heads_cuda_kernels.cu, the exp activation with ATen.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_bind.h"
#include "heads/heads_cuda.h"

namespace rgpt4d {
namespace {

void check(const at::Tensor& x, int64_t r, int64_t activation, const char* op) {
  TORCH_CHECK(x.dim() == 4 && x.is_floating_point() && r >= 1 && x.size(1) % (r * r) == 0 &&
                  (activation == 0 || activation == 1),
              op, ": need a floating x [N, C*r*r, H, W], upscale r >= 1 and activation 0 or 1, got ", x.sizes(),
              " and r = ", r);
}

at::Tensor pixel_shuffle_act_cuda(const at::Tensor& x, int64_t r, int64_t activation, double clamp_max) {
  check(x, r, activation, "pixel_shuffle_act");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1) / (r * r), H = x.size(2), W = x.size(3);
  at::Tensor y = at::empty({N, C, H * r, W * r}, x.options());
  const int64_t s[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  check_cuda(cuda::pixel_shuffle_launch(to_dtype(x.scalar_type()), y.data_ptr(), const_cast<void*>(x.data_ptr()), s, N,
                                        C, H, W, r, true, c10::cuda::getCurrentCUDAStream()),
             "pixel_shuffle_act");
  if (activation == 1) y.clamp_max_(clamp_max).exp_();
  return y;
}

at::Tensor pixel_shuffle_act_backward_cuda(const at::Tensor& grad, const at::Tensor& x, int64_t r, int64_t activation,
                                           double clamp_max) {
  check(x, r, activation, "pixel_shuffle_act_backward");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1) / (r * r), H = x.size(2), W = x.size(3);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({N, C, H * r, W * r}), "pixel_shuffle_act_backward: grad must be [",
              N, ", ", C, ", ", H * r, ", ", W * r, "]");
  at::Tensor g = grad.to(x.scalar_type()).contiguous();
  at::Tensor gx = at::empty_like(x);
  const int64_t s[4] = {gx.stride(0), gx.stride(1), gx.stride(2), gx.stride(3)};
  check_cuda(cuda::pixel_shuffle_launch(to_dtype(x.scalar_type()), g.data_ptr(), gx.data_ptr(), s, N, C, H, W, r,
                                        false, c10::cuda::getCurrentCUDAStream()),
             "pixel_shuffle_act_backward");
  if (activation == 1) gx.mul_(x.clamp_max(clamp_max).exp_().mul_(x.le(clamp_max)));
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(rgpt4d, CUDA, m) {
  m.impl("pixel_shuffle_act", &pixel_shuffle_act_cuda);
  m.impl("pixel_shuffle_act_backward", &pixel_shuffle_act_backward_cuda);
}

}  // namespace rgpt4d
