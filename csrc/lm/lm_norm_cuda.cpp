// CUDA bindings of RMSNorm, SwiGLU and RoPE (CPU kernels in lm_norm.cpp, schemas in rgpt4d/ops/lm.py): tensors -> raw
// pointers -> the launchers in lm_cuda_kernels.cu. grad_w of RMSNorm is a column reduction over
// rows, done with ATen (deterministic: no atomics).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/acc.h"
#include "common/cuda_bind.h"
#include "lm/lm_cuda.h"

namespace rgpt4d {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 1 && w_in.size(0) == x_in.size(1) && x_in.is_floating_point() &&
                  w_in.is_floating_point() && x_in.device() == w_in.device(),
              "rms_norm: need floating x [N, D] and weight [D] on one device, got x ", x_in.sizes(), " and weight ",
              w_in.sizes());
  c10::cuda::CUDAGuard guard(x_in.device());
  // the kernels pair float64 only with float64: a float64 weight or input makes the whole call float64
  const at::ScalarType out_t = at::promote_types(x_in.scalar_type(), w_in.scalar_type());
  const bool dbl = out_t == at::kDouble;
  const at::Tensor x = (dbl ? x_in.to(at::kDouble) : x_in).contiguous(), w = (dbl ? w_in.to(at::kDouble) : w_in).contiguous();
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor y = at::empty({N, D}, x.options().dtype(out_t));
  at::Tensor rstd = at::empty({N}, x.options().dtype(dbl ? at::kDouble : at::kFloat));
  check_cuda(cuda::rms_norm_fwd_launch(to_dtype(x.scalar_type()), to_dtype(w.scalar_type()), to_dtype(out_t),
                                       x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr(), N, D, eps,
                                       c10::cuda::getCurrentCUDAStream()),
             "rms_norm");
  rstd = rstd.to(acc_type(x_in.scalar_type()));
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                          const at::Tensor& w_in, const at::Tensor& rstd_in,
                                                          bool need_x, bool need_w) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 1 && w_in.size(0) == x_in.size(1) && grad_y.sizes() == x_in.sizes(),
              "rms_norm_backward: need grad_y and x [N, D] and weight [D]");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::ScalarType acc = acc_type(x_in.scalar_type());
  TORCH_CHECK(rstd_in.dim() == 1 && rstd_in.size(0) == x_in.size(0) && rstd_in.scalar_type() == acc,
              "rms_norm_backward: rstd must be [N] in ", acc);
  const bool dbl = x_in.scalar_type() == at::kDouble || w_in.scalar_type() == at::kDouble ||
                   grad_y.scalar_type() == at::kDouble;
  const auto as = [&](const at::Tensor& t) { return (dbl ? t.to(at::kDouble) : t).contiguous(); };
  const at::Tensor x = as(x_in), w = as(w_in), gy = as(grad_y), rstd = as(rstd_in);
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor gx = need_x ? at::empty({N, D}, x.options()) : at::empty({0}, x_in.options());
  at::Tensor gw = at::empty({0}, x.options().dtype(acc));
  if (need_x)
    check_cuda(cuda::rms_norm_bwd_launch(to_dtype(gy.scalar_type()), to_dtype(x.scalar_type()),
                                         to_dtype(w.scalar_type()), gy.data_ptr(), x.data_ptr(), w.data_ptr(),
                                         rstd.data_ptr(), gx.data_ptr(), N, D, c10::cuda::getCurrentCUDAStream()),
               "rms_norm_backward");
  if (need_w) gw = (gy.to(acc) * x.to(acc) * rstd.to(acc).unsqueeze(1)).sum(0);
  return {need_x ? gx.to(x_in.scalar_type()) : gx, gw};
}

at::Tensor swiglu_cuda(const at::Tensor& g_in, const at::Tensor& u_in) {
  TORCH_CHECK(g_in.sizes() == u_in.sizes() && g_in.scalar_type() == u_in.scalar_type() && g_in.is_floating_point(),
              "swiglu: gate and up must be floating tensors of one shape and dtype");
  c10::cuda::CUDAGuard guard(g_in.device());
  const at::Tensor g = g_in.contiguous(), u = u_in.contiguous();
  at::Tensor y = at::empty(g.sizes(), g.options());
  check_cuda(cuda::swiglu_fwd_launch(to_dtype(g.scalar_type()), g.data_ptr(), u.data_ptr(), y.data_ptr(), g.numel(),
                                     c10::cuda::getCurrentCUDAStream()),
             "swiglu");
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad, const at::Tensor& g_in,
                                                        const at::Tensor& u_in) {
  TORCH_CHECK(g_in.sizes() == u_in.sizes() && grad.sizes() == g_in.sizes() && g_in.scalar_type() == u_in.scalar_type(),
              "swiglu_backward: grad, gate and up must have one shape (and gate/up one dtype)");
  c10::cuda::CUDAGuard guard(g_in.device());
  const at::Tensor g = g_in.contiguous(), u = u_in.contiguous(), gy = grad.to(g.scalar_type()).contiguous();
  at::Tensor dg = at::empty(g.sizes(), g.options()), du = at::empty(g.sizes(), g.options());
  check_cuda(cuda::swiglu_bwd_launch(to_dtype(g.scalar_type()), gy.data_ptr(), g.data_ptr(), u.data_ptr(),
                                     dg.data_ptr(), du.data_ptr(), g.numel(), c10::cuda::getCurrentCUDAStream()),
             "swiglu_backward");
  return {dg, du};
}

at::Tensor rope_one(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const at::Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  cuda::RopeShape sh{x.size(0), x.size(1), x.size(2), x.size(3), cos.size(0), {x.stride(0), x.stride(1), x.stride(2)},
                     {out.stride(0), out.stride(1), out.stride(2)}};
  check_cuda(cuda::rope_launch(to_dtype(x.scalar_type()), x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
                               sh, backward, c10::cuda::getCurrentCUDAStream()),
             backward ? "rope_backward" : "rope");
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope_run_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_in,
                                                 const at::Tensor& sin_in, bool backward) {
  const char* op = backward ? "rope_backward" : "rope";
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && cos_in.dim() == 3 && sin_in.sizes() == cos_in.sizes() &&
                  q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3) &&
                  (cos_in.size(0) == q.size(0) || cos_in.size(0) == 1) && cos_in.size(1) == q.size(2) &&
                  cos_in.size(2) == q.size(3) && q.size(3) % 2 == 0 && q.scalar_type() == k.scalar_type(),
              op, ": need q [B, H, L, D], k [B, Hk, L, D] (one dtype, D even), cos and sin [B or 1, L, D]");
  c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor cos = cos_in.to(q.scalar_type()).contiguous(), sin = sin_in.to(q.scalar_type()).contiguous();
  return {rope_one(q, cos, sin, backward), rope_one(k, cos, sin, backward)};
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin) {
  return rope_run_cuda(q, k, cos, sin, false);
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cuda(const at::Tensor& gq, const at::Tensor& gk,
                                                      const at::Tensor& cos, const at::Tensor& sin) {
  return rope_run_cuda(gq, gk, cos, sin, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(rgpt4d, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
  m.impl("rope", &rope_cuda);
  m.impl("rope_backward", &rope_backward_cuda);
}

}  // namespace rgpt4d
