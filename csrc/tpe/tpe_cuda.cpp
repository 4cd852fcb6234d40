// CUDA bindings of the TPE ops: tensors -> raw pointers -> the launchers in tpe_cuda_kernels.cu.
// Checks mirror the CPU ones (tpe_common.h); index-range checks are left to the Python layer
// (they need a device sync).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_bind.h"
#include "tpe/tpe_common.h"
#include "tpe/tpe_cuda.h"

namespace rgpt4d {
namespace {

cuda::EncArgs enc_args(const EncoderInputs& in, int64_t D, double base) {
  cuda::EncArgs a;
  a.table_acc = in.table.defined() ? in.table.data_ptr() : nullptr;
  a.rows = in.rows.defined() ? in.rows.data_ptr<int64_t>() : nullptr;
  a.seconds_acc = in.seconds.defined() ? in.seconds.data_ptr() : nullptr;
  a.D = D;
  a.log_base = std::log(base);
  return a;
}

// Called under the tensor's device guard: the limit is the current device's.
void check_shared_d(int64_t D, at::ScalarType t, const char* op) {
  const int64_t acc_bytes = t == at::kDouble ? 8 : 4;
  const int64_t limit = cuda::tpe_max_encoding_bytes(to_dtype(t));
  TORCH_CHECK(D * acc_bytes <= limit, op, ": the cuda backend caches a frame's encoding in shared memory and ",
              "supports D <= ", limit / acc_bytes, " for ", t, " on this GPU, got D = ", D, "; use backend='triton'");
}

void tpe_add_cuda_into(const at::Tensor& xc, const at::Tensor& timestamps, const c10::optional<at::Tensor>& table,
                       double base, const at::Tensor& out, const char* op) {
  const int64_t BT = xc.size(0) * xc.size(1), N = xc.size(2), D = xc.size(3);
  check_shared_d(D, xc.scalar_type(), op);
  const EncoderInputs in = prepare_encoder(timestamps, table, acc_type(xc.scalar_type()), op, false);
  check_cuda(cuda::tpe_add_launch(to_dtype(xc.scalar_type()), xc.data_ptr(), out.data_ptr(), enc_args(in, D, base), BT,
                                  N, c10::cuda::getCurrentCUDAStream()),
             op);
}

at::Tensor tpe_add_cuda(const at::Tensor& x, const at::Tensor& timestamps, const c10::optional<at::Tensor>& table,
                        double base) {
  check_tpe_shapes(x, timestamps, table, "tpe_add");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  tpe_add_cuda_into(xc, timestamps, table, base, out, "tpe_add");
  return out;
}

void tpe_add_inplace_cuda(const at::Tensor& x, const at::Tensor& timestamps, const c10::optional<at::Tensor>& table,
                          double base) {
  check_tpe_shapes(x, timestamps, table, "tpe_add_");
  c10::cuda::CUDAGuard guard(x.device());
  if (x.is_contiguous()) {
    tpe_add_cuda_into(x, timestamps, table, base, x, "tpe_add_");
  } else {
    at::Tensor xc = x.contiguous();
    tpe_add_cuda_into(xc, timestamps, table, base, xc, "tpe_add_");
    x.copy_(xc);
  }
}

at::Tensor tpe_table_backward_cuda(const at::Tensor& grad, const at::Tensor& timestamps, int64_t num_rows,
                                   bool deterministic) {
  TORCH_CHECK(grad.dim() == 4, "tpe_table_backward: grad must be [B, T, N, D]");
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t BT = grad.size(0) * grad.size(1), N = grad.size(2), D = grad.size(3);
  const at::ScalarType acc = acc_type(grad.scalar_type());
  at::Tensor out = at::zeros({num_rows, D}, grad.options().dtype(acc));
  if (BT == 0 || D == 0) return out;
  const at::Tensor g = grad.contiguous();
  const at::Tensor rows = timestamps.to(at::kLong).contiguous();
  at::Tensor partial = deterministic ? at::empty({BT, D}, grad.options().dtype(acc)) : at::Tensor();
  check_cuda(cuda::tpe_table_grad_launch(to_dtype(g.scalar_type()), g.data_ptr(), rows.data_ptr<int64_t>(),
                                         deterministic ? partial.data_ptr() : nullptr, out.data_ptr(), BT, N, D,
                                         deterministic, c10::cuda::getCurrentCUDAStream()),
             "tpe_table_backward");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tpe_ds_ln_cuda(
    const at::Tensor& x, const at::Tensor& timestamps, const c10::optional<at::Tensor>& table,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, int64_t h, int64_t w,
    int64_t window, double eps, double base) {
  check_ds_ln_shapes(x, timestamps, table, weight, bias, h, w, window, "tpe_downsample_layernorm");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), D = x.size(3);
  check_shared_d(D, x.scalar_type(), "tpe_downsample_layernorm");
  const DsGeom geo = make_ds_geom(h, w, window, D);
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({B, T, geo.M(), geo.K()}, x.options());
  at::Tensor mean = at::empty({B, T, geo.M()}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({B, T, geo.M()}, x.options().dtype(acc));
  const EncoderInputs in = prepare_encoder(timestamps, table, acc, "tpe_downsample_layernorm", false);
  const at::Tensor wt = (weight.has_value() && weight->defined()) ? weight->to(acc).contiguous() : at::Tensor();
  const at::Tensor bs = (bias.has_value() && bias->defined()) ? bias->to(acc).contiguous() : at::Tensor();
  check_cuda(cuda::tpe_ds_ln_fwd_launch(to_dtype(x.scalar_type()), xc.data_ptr(), enc_args(in, D, base),
                                        wt.defined() ? wt.data_ptr() : nullptr, bs.defined() ? bs.data_ptr() : nullptr,
                                        out.data_ptr(), mean.data_ptr(), rstd.data_ptr(), geo, B * T, eps,
                                        c10::cuda::getCurrentCUDAStream()),
             "tpe_downsample_layernorm");
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tpe_ds_ln_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& timestamps,
    const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t h, int64_t w, int64_t window, double base, bool need_input_grad,
    bool need_weight_grad, bool need_bias_grad) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), D = x.size(3), BT = B * T;
  check_shared_d(D, x.scalar_type(), "tpe_downsample_layernorm");
  const DsGeom geo = make_ds_geom(h, w, window, D);
  const int64_t M = geo.M(), K = geo.K(), rows = BT * M;
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == B && grad_out.size(1) == T && grad_out.size(2) == M &&
                  grad_out.size(3) == K,
              "tpe_ds_ln_backward: grad_out must be [B, T, M, K]");
  const bool has_w = weight.has_value() && weight->defined();
  need_weight_grad = need_weight_grad && has_w;
  const at::ScalarType acc = acc_type(x.scalar_type());
  at::Tensor grad_x = need_input_grad ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor grad_w = need_weight_grad ? at::zeros({K}, x.options().dtype(acc)) : at::empty({0}, x.options().dtype(acc));
  at::Tensor grad_b = need_bias_grad ? at::zeros({K}, x.options().dtype(acc)) : at::empty({0}, x.options().dtype(acc));
  if (rows == 0 || K == 0 || !(need_input_grad || need_weight_grad || need_bias_grad)) return {grad_x, grad_w, grad_b};
  const EncoderInputs in = prepare_encoder(timestamps, table, acc, "tpe_downsample_layernorm", false);
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous(), mc = mean.contiguous(), rc = rstd.contiguous();
  const at::Tensor wt = has_w ? weight->to(acc).contiguous() : at::Tensor();
  const int64_t splits = std::min<int64_t>(rows, 64);
  at::Tensor part_w = need_weight_grad ? at::empty({splits, K}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor part_b = need_bias_grad ? at::empty({splits, K}, x.options().dtype(acc)) : at::Tensor();
  check_cuda(cuda::tpe_ds_ln_bwd_launch(to_dtype(x.scalar_type()), gc.data_ptr(), xc.data_ptr(), enc_args(in, D, base),
                                        has_w ? wt.data_ptr() : nullptr, mc.data_ptr(), rc.data_ptr(),
                                        need_input_grad ? grad_x.data_ptr() : nullptr,
                                        need_weight_grad ? part_w.data_ptr() : nullptr,
                                        need_bias_grad ? part_b.data_ptr() : nullptr, splits, geo, BT,
                                        c10::cuda::getCurrentCUDAStream()),
             "tpe_downsample_layernorm backward");
  if (need_weight_grad) grad_w = part_w.sum(0);  // fixed split order: deterministic
  if (need_bias_grad) grad_b = part_b.sum(0);
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(rgpt4d, CUDA, m) {
  m.impl("tpe_add", &tpe_add_cuda);
  m.impl("tpe_add_", &tpe_add_inplace_cuda);
  m.impl("tpe_table_backward", &tpe_table_backward_cuda);
  m.impl("tpe_ds_ln", &tpe_ds_ln_cuda);
  m.impl("tpe_ds_ln_backward", &tpe_ds_ln_backward_cuda);
}

}  // namespace rgpt4d
