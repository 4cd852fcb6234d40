// The chunked "linear + loss" driver of the fused ops, host side (CPU and CUDA bindings): the LM
// cross-entropy (lm/lm_common.h) and the P4D latent loss (p4d/p4d_common.h) differ only in the
// per-chunk loss, a small policy passed in.
//
// For each chunk of `chunk` rows of h (every row, or the ascending row indices `rows`):
//   y = h_c W^T (+ b)                [len, V], one GEMM, contiguous, in h's dtype
//   loss(y, c0, len, write_grad)     the policy: the chunk's loss, and when write_grad (some
//                                    gradient is wanted) y <- dloss/dy in place
//   grad_h rows = y W                one GEMM (rows not taking part keep a zero gradient)
//   grad_w += y^T h_c, grad_b += y^T 1   GEMM / GEMV in the accumulation dtype (common/acc.h)
// No atomics and a fixed chunk order: deterministic. The [N, V] projection and its gradient never
// exist whole, and rows outside `rows` cost nothing.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "common/acc.h"

namespace rgpt4d {

// Allocation of a large output: CPU kernels pass the output cache (cpu/alloc.h), CUDA at::empty.
using EmptyFn = at::Tensor (*)(at::IntArrayRef sizes, const at::TensorOptions& options);

struct LinearLossGrads {
  at::Tensor h, w, b;  // [N, D] (h's dtype), [V, D] and [V] (accumulation dtype), or [0] when not wanted
};

// h [N, D], weight [V, D], bias [V] or undefined: contiguous and checked by the caller. rows:
// ascending int64 indices of the n rows that take part, or undefined for all N rows (n == N).
// loss(at::Tensor& y, int64_t c0, int64_t len, bool write_grad): chunk rows [c0, c0 + len) of the
// n; when write_grad it writes dloss/dy over y (need_b counts only with a bias).
template <typename ChunkLoss>
LinearLossGrads linear_loss_chunks(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                                   const at::Tensor& rows, int64_t n, int64_t chunk, bool need_h, bool need_w,
                                   bool need_b, EmptyFn empty, ChunkLoss&& loss) {
  const int64_t N = h.size(0), D = h.size(1), V = weight.size(0);
  const at::ScalarType acc = acc_type(h.scalar_type());
  const auto acc_opts = h.options().dtype(acc);
  need_b = need_b && bias.defined();
  LinearLossGrads g;
  g.h = need_h ? empty({N, D}, h.options()) : at::empty({0}, h.options());
  if (need_h && rows.defined()) g.h.zero_();
  g.w = need_w ? empty({V, D}, acc_opts).zero_() : at::empty({0}, acc_opts);
  g.b = need_b ? at::zeros({V}, acc_opts) : at::empty({0}, acc_opts);
  const bool write_grad = need_h || need_w || need_b;
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t len = std::min(chunk, n - c0);
    const at::Tensor ic = rows.defined() ? rows.narrow(0, c0, len) : at::Tensor();
    const at::Tensor hc = rows.defined() ? h.index_select(0, ic) : h.narrow(0, c0, len);
    at::Tensor y = (bias.defined() ? at::addmm(bias, hc, weight.t()) : at::mm(hc, weight.t())).contiguous();
    loss(y, c0, len, write_grad);
    if (!write_grad) continue;
    // y now holds the gradient of the loss with respect to the projection.
    if (need_h) {
      if (rows.defined()) {
        g.h.index_copy_(0, ic, at::mm(y, weight));
      } else {
        at::Tensor dst = g.h.narrow(0, c0, len);
        at::mm_out(dst, y, weight);
      }
    }
    if (need_w || need_b) {
      const at::Tensor y_acc = y.scalar_type() == acc ? y : y.to(acc);
      if (need_w) g.w.addmm_(y_acc.t(), hc.scalar_type() == acc ? hc : hc.to(acc));
      if (need_b) g.b.addmv_(y_acc.t(), at::ones({len}, y_acc.options()));
    }
  }
  return g;
}

}  // namespace rgpt4d
