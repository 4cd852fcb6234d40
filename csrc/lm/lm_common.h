// Argument checks and the host side of the fused linear + cross-entropy op, shared by the CPU
// (lm.cpp) and CUDA (lm_cuda.cpp) bindings. The Python layer validates user input with
// friendlier messages; these checks keep the kernels memory-safe when the op is called directly.
//
// Only the rows whose target is not ignore_index contribute to the loss or to any gradient: they
// are selected first, then projected and reduced chunk by chunk by the shared linear-loss driver
// (common/linear_loss.h). Its per-chunk policy here is the row kernel: each row's loss
// lse - x_t and, in place, the gradient scale * (softmax - onehot(t)) (scale 1/n for the mean).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "common/acc.h"
#include "common/linear_loss.h"
#include "lm/lm_math.h"

namespace rgpt4d {

// The device-specific pieces: output allocation, and the row kernel
//   rows(logits [R, V] contiguous (h's dtype), target [R] int64 (all valid), scale, write_grad,
//        row_loss [R] float64): row_loss[r] = lse_r - x_{r, t_r}; when write_grad, logits[r] <-
//        scale * (softmax(logits[r]) - onehot(t_r)) (each element read before it is written).
struct LceHostOps {
  EmptyFn empty;
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
  const int64_t N = a.h.size(0), V = a.weight.size(0);
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
  LinearLossGrads g = linear_loss_chunks(
      a.h, a.weight, a.bias, all_rows ? at::Tensor() : idx, n, a.chunk, need_h, need_w, need_b, ops.empty,
      [&](at::Tensor& logits, int64_t c0, int64_t len, bool write_grad) {
        ops.rows(logits, tsel.narrow(0, c0, len), scale, write_grad, row_loss.narrow(0, c0, len));
      });
  // Like F.cross_entropy: the mean over no selected row is NaN (0 / 0); the sum is 0.
  at::Tensor total = row_loss.sum();
  if (reduction == kLceMean) total = n > 0 ? total / static_cast<double>(n) : at::full({}, std::nan(""), total.options());
  return {total.to(acc_type(a.h.scalar_type())), g.h, g.w, g.b};
}

}  // namespace rgpt4d
