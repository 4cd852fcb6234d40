// Argument checks and the host-side driver of the fused linear + cross-entropy op, shared by the
// CPU (lm.cpp) and CUDA (lm_cuda.cpp) bindings. The Python layer validates user input with
// friendlier messages; these checks keep the kernels memory-safe when the op is called directly.
//
// The driver: select the rows whose target is not ignore_index (only those contribute to the
// loss or to any gradient), then chunk by chunk of `chunk` selected rows: logits = h_c W^T (+ b)
// [c, V] (one GEMM), the row kernel turns them into the loss of each row and, in place, the
// gradient of the loss with respect to them (scaled by 1/n for the mean), then grad_h rows =
// G W and grad_W += G^T h_c, grad_b += G^T 1 (GEMMs: deterministic). The [N, V] logits and
// their gradient never exist whole; ignored rows cost nothing.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "lm/lm_math.h"

namespace rgpt4d {

// float64 inputs accumulate in float64, everything else in float32.
inline at::ScalarType lce_acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The device-specific pieces: output allocation, and the row kernel
//   rows(logits [R, V] contiguous (h's dtype), target [R] int64 (all valid), scale, write_grad,
//        row_loss [R] float64): row_loss[r] = lse_r - x_{r, t_r}; when write_grad, logits[r] <-
//        scale * (softmax(logits[r]) - onehot(t_r)) (each element read before it is written).
struct LceHostOps {
  at::Tensor (*zeros)(at::IntArrayRef sizes, const at::TensorOptions& options);
  void (*rows)(at::Tensor logits, const at::Tensor& target, double scale, bool write_grad, at::Tensor row_loss);
};

struct LceArgs {
  at::Tensor h, weight, bias, target;  // h [N, D], weight [V, D], bias [V] or undefined, target [N] int64
  int64_t ignore_index;
  int64_t chunk;
};

inline LceArgs lce_args(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& target, int64_t ignore_index, int64_t chunk_size) {
  const char* op = "fused_linear_cross_entropy";
  TORCH_CHECK(h.dim() == 2 && weight.dim() == 2 && h.size(1) == weight.size(1), op,
              ": need h [N, D] and weight [V, D], got h ", h.sizes(), " and weight ", weight.sizes());
  TORCH_CHECK(h.is_floating_point() && weight.scalar_type() == h.scalar_type(), op,
              ": h and weight must be floating tensors of one dtype, got ", h.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == h.size(0) && target.scalar_type() == at::kLong, op,
              ": target must be int64 [N] = [", h.size(0), "], got ", target.scalar_type(), " ", target.sizes());
  TORCH_CHECK(weight.device() == h.device() && target.device() == h.device(), op,
              ": all tensors must be on one device");
  TORCH_CHECK(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
  LceArgs a;
  a.h = h.contiguous();
  a.weight = weight.contiguous();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == h.scalar_type() &&
                    bias->device() == h.device(),
                op, ": bias must be [V] = [", weight.size(0), "] in h's dtype on h's device");
    a.bias = bias->contiguous();
  }
  a.target = target.contiguous();
  a.ignore_index = ignore_index;
  a.chunk = chunk_size;
  return a;
}

// (loss, grad_h or [0], grad_w (acc dtype) or [0], grad_b (acc dtype) or [0]).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lce_forward_driver(const LceArgs& a,
                                                                                     int64_t reduction, bool need_h,
                                                                                     bool need_w, bool need_b,
                                                                                     const LceHostOps& ops) {
  const char* op = "fused_linear_cross_entropy";
  TORCH_CHECK(reduction == kLceMean || reduction == kLceSum, op, ": unknown reduction ", reduction);
  const int64_t N = a.h.size(0), D = a.h.size(1), V = a.weight.size(0);
  const at::ScalarType acc = lce_acc_type(a.h.scalar_type());
  const auto acc_opts = a.h.options().dtype(acc);
  need_b = need_b && a.bias.defined();
  // Ignored rows get exactly zero gradient: grad_h starts at zero and only selected rows are written.
  at::Tensor grad_h = need_h ? ops.zeros({N, D}, a.h.options()) : at::empty({0}, a.h.options());
  at::Tensor grad_w = need_w ? ops.zeros({V, D}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor grad_b = need_b ? ops.zeros({V}, acc_opts) : at::empty({0}, acc_opts);
  const bool write_grad = need_h || need_w || need_b;

  const at::Tensor idx = at::nonzero(a.target.ne(a.ignore_index)).view({-1});  // selected rows, ascending
  const int64_t n = idx.size(0);
  const bool all_rows = n == N;
  const at::Tensor tsel = all_rows ? a.target : a.target.index_select(0, idx);
  if (n > 0) {
    TORCH_CHECK(V > 0, op, ": the weight has no classes (V = 0) but ", n, " rows have a target");
    const bool bad = at::logical_or(tsel.lt(0), tsel.ge(V)).any().item<bool>();
    TORCH_CHECK(!bad, op, ": a target is out of range [0, ", V, ") (and is not ignore_index ", a.ignore_index,
                "): min ", tsel.min().item<int64_t>(), ", max ", tsel.max().item<int64_t>());
  }
  const double scale = reduction == kLceMean ? (n > 0 ? 1.0 / static_cast<double>(n) : 0.0) : 1.0;
  at::Tensor row_loss = at::empty({n}, a.h.options().dtype(at::kDouble));
  for (int64_t c0 = 0; c0 < n; c0 += a.chunk) {
    const int64_t len = std::min(a.chunk, n - c0);
    const at::Tensor ic = idx.narrow(0, c0, len);
    const at::Tensor hc = all_rows ? a.h.narrow(0, c0, len) : a.h.index_select(0, ic);
    at::Tensor logits = (a.bias.defined() ? at::addmm(a.bias, hc, a.weight.t()) : at::mm(hc, a.weight.t())).contiguous();
    ops.rows(logits, tsel.narrow(0, c0, len), scale, write_grad, row_loss.narrow(0, c0, len));
    if (!write_grad) continue;
    const at::Tensor& g = logits;  // now the gradient of the loss with respect to the logits
    if (need_h) {
      if (all_rows) {
        at::Tensor dst = grad_h.narrow(0, c0, len);
        at::mm_out(dst, g, a.weight);
      } else {
        grad_h.index_copy_(0, ic, at::mm(g, a.weight));
      }
    }
    if (need_w || need_b) {
      const at::Tensor g_acc = g.scalar_type() == acc ? g : g.to(acc);
      if (need_w) grad_w.addmm_(g_acc.t(), hc.scalar_type() == acc ? hc : hc.to(acc));
      if (need_b) grad_b.addmv_(g_acc.t(), at::ones({len}, g_acc.options()));
    }
  }
  // Like F.cross_entropy: the mean over no selected row is NaN (0 / 0); the sum is 0.
  at::Tensor total = row_loss.sum();
  if (reduction == kLceMean) total = n > 0 ? total / static_cast<double>(n) : at::full({}, std::nan(""), total.options());
  return {total.to(acc), grad_h, grad_w, grad_b};
}

}  // namespace rgpt4d
