// Argument checks and host-side drivers shared by the CPU (p4d.cpp) and CUDA (p4d_cuda.cpp)
// bindings of the P4D loss ops. The Python layer validates user input with messages naming the
// term first; these checks keep the kernels memory-safe when the ops are called directly.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "common/acc.h"
#include "common/linear_loss.h"
#include "p4d/p4d_math.h"

namespace rgpt4d {

// One term of p4d_loss, checked, with contiguous pred / target / canonical mask.
// Element e of the term is valid iff !has_mask or mask[(e / inner) % period].
struct P4DTerm {
  at::Tensor pred, target, mask;
  int64_t numel = 0, inner = 1, period = 1;
  int kind = kP4DSmoothL1, flags = 0;
  double beta = 1.0, weight = 0.0, grad_factor = 1.0;  // grad_factor f: the weight, or 1 when it is 0
  bool log() const { return flags & kP4DFlagLog; }
  bool need_grad() const { return flags & kP4DFlagGrad; }
  bool has_mask() const { return flags & kP4DFlagMask; }
  bool acc_double() const {
    return pred.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble;
  }
};

inline std::vector<P4DTerm> p4d_check_terms(at::TensorList preds, at::TensorList targets, at::TensorList masks,
                                            at::IntArrayRef mask_inner, at::IntArrayRef kinds,
                                            at::ArrayRef<double> betas, at::IntArrayRef flags,
                                            at::ArrayRef<double> weights) {
  const size_t n = preds.size();
  TORCH_CHECK(n >= 1, "p4d_loss: needs at least one term");
  TORCH_CHECK(targets.size() == n && masks.size() == n && mask_inner.size() == n && kinds.size() == n &&
                  betas.size() == n && flags.size() == n && weights.size() == n,
              "p4d_loss: every per-term list must have one entry per prediction (", n, ")");
  std::vector<P4DTerm> terms(n);
  const at::Device dev = preds[0].device();
  for (size_t i = 0; i < n; ++i) {
    P4DTerm& T = terms[i];
    const at::Tensor& p = preds[i];
    const at::Tensor& t = targets[i];
    TORCH_CHECK(p.is_floating_point() && t.is_floating_point(), "p4d_loss: term ", i,
                ": prediction and target must be floating tensors, got ", p.scalar_type(), " and ", t.scalar_type());
    TORCH_CHECK(p.sizes() == t.sizes(), "p4d_loss: term ", i, ": prediction ", p.sizes(), " and target ",
                t.sizes(), " must have the same shape");
    TORCH_CHECK(p.device() == dev && t.device() == dev, "p4d_loss: term ", i, ": all tensors must be on ", dev);
    TORCH_CHECK(kinds[i] >= kP4DSmoothL1 && kinds[i] <= kP4DL1, "p4d_loss: term ", i, ": unknown loss kind ",
                kinds[i]);
    TORCH_CHECK(betas[i] >= 0, "p4d_loss: term ", i, ": beta must be >= 0, got ", betas[i]);
    T.kind = static_cast<int>(kinds[i]);
    if (T.kind == kP4DSmoothL1 && betas[i] == 0) T.kind = kP4DL1;  // as F.smooth_l1_loss
    T.beta = betas[i];
    T.flags = static_cast<int>(flags[i]);
    T.weight = weights[i];
    T.grad_factor = weights[i] != 0 ? weights[i] : 1.0;
    T.pred = p.contiguous();
    T.target = t.contiguous();
    T.numel = p.numel();
    if (T.has_mask()) {
      const at::Tensor& m = masks[i];
      TORCH_CHECK(m.scalar_type() == at::kBool && m.device() == dev, "p4d_loss: term ", i,
                  ": the mask must be a bool tensor on ", dev, ", got ", m.scalar_type(), " on ", m.device());
      T.mask = m.contiguous();
      T.inner = mask_inner[i];
      T.period = m.numel();
      TORCH_CHECK(T.numel == 0 || (T.inner >= 1 && T.period >= 1 && T.numel % (T.inner * T.period) == 0),
                  "p4d_loss: term ", i, ": a mask of ", T.period, " elements repeated every ", T.inner,
                  " elements does not tile the prediction's ", T.numel, " elements");
    }
  }
  return terms;
}

// What the shared host code needs from a backend besides its kernels. ATen's CPU reductions
// (sum, count_nonzero) stall for milliseconds when their OpenMP threads are contended (a machine
// shared with busy processes), so the CPU binding counts and sums with its own loops; CUDA uses ATen.
struct P4DHostOps {
  at::Tensor (*count_true)(const at::Tensor& mask);  // number of true elements: 0-dim int64, mask's device
  at::Tensor (*sum_f64)(const at::Tensor& v);        // sum of a 1-D float64 tensor in a fixed order: 0-dim
  EmptyFn empty;  // large gradient outputs
  // The elementwise part of the fused linear loss over one chunk of projected rows:
  //   rows(y [R, D_out] (in: projection, out: gradient when write_grad), target [R, D_out],
  //        mask [R] or undefined, row_scale [R] (acc) or undefined, scale (0-dim acc tensor),
  //        kind, beta, write_grad, row_loss [R] float64 (out: the loss summed over the row))
  // The gradient written is scale * row_scale[r] * loss'(y - target); masked rows get 0.
  void (*rows)(at::Tensor y, const at::Tensor& target, const at::Tensor& mask, const at::Tensor& row_scale,
               const at::Tensor& scale, int kind, double beta, bool write_grad, at::Tensor row_loss);
};

// Number of valid elements per term (the mean's denominator), an int64 tensor [n] on the
// terms' device: no host sync on CUDA.
inline at::Tensor p4d_counts(const std::vector<P4DTerm>& terms, const P4DHostOps& ops) {
  std::vector<at::Tensor> parts;
  parts.reserve(terms.size());
  const auto opts = terms[0].pred.options().dtype(at::kLong);
  for (const P4DTerm& T : terms) {
    if (T.has_mask() && T.numel > 0) {
      parts.push_back(ops.count_true(T.mask).mul(T.numel / T.period).reshape({1}));
    } else {
      parts.push_back(at::full({1}, T.has_mask() ? 0 : T.numel, opts));
    }
  }
  return at::cat(parts);
}

inline at::ScalarType p4d_out_acc_type(const std::vector<P4DTerm>& terms) {
  for (const P4DTerm& T : terms)
    if (T.acc_double()) return at::kDouble;
  return at::kFloat;
}

// ---- fused Linear + latent loss ------------------------------------------------------------
// h [N, D_in], weight [D_out, D_in], bias [D_out]?, target [N, D_out], mask [N] bool?.
// Reductions: 0 none (per-token mean over D_out), 1 mean (over the valid tokens' elements), 2 sum.

enum P4DReduction : int { kP4DNone = 0, kP4DMean = 1, kP4DSum = 2 };

inline void p4d_check_linear(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& target, const c10::optional<at::Tensor>& mask, int64_t kind,
                             double beta, int64_t chunk_size) {
  const char* op = "fused_linear_latent_loss";
  TORCH_CHECK(h.dim() == 2 && weight.dim() == 2 && weight.size(1) == h.size(1), op,
              ": h must be [N, D_in] and weight [D_out, D_in], got ", h.sizes(), " and ", weight.sizes());
  TORCH_CHECK(h.is_floating_point() && weight.scalar_type() == h.scalar_type(), op,
              ": h and weight must share a floating dtype, got ", h.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(target.dim() == 2 && target.size(0) == h.size(0) && target.size(1) == weight.size(0), op,
              ": target must be [N, D_out] = [", h.size(0), ", ", weight.size(0), "], got ", target.sizes());
  TORCH_CHECK(target.is_floating_point(), op, ": target must be a floating tensor");
  TORCH_CHECK(weight.device() == h.device() && target.device() == h.device(), op, ": all tensors must be on ",
              h.device());
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == h.scalar_type() &&
                    bias->device() == h.device(),
                op, ": bias must be [D_out] with h's dtype and device, got ", bias->sizes());
  if (mask.has_value() && mask->defined())
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == h.size(0) && mask->scalar_type() == at::kBool &&
                    mask->device() == h.device(),
                op, ": mask must be a bool [N] = [", h.size(0), "] tensor, got ", mask->sizes());
  TORCH_CHECK(kind >= kP4DSmoothL1 && kind <= kP4DL1, op, ": unknown loss kind ", kind);
  TORCH_CHECK(beta >= 0, op, ": beta must be >= 0, got ", beta);
  TORCH_CHECK(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
}

struct P4DLinearArgs {
  at::Tensor h, weight, bias, target, mask;  // contiguous; bias/mask may be undefined
  int kind;
  double beta;
  int64_t chunk;
};

inline P4DLinearArgs p4d_linear_args(const at::Tensor& h, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                                     const c10::optional<at::Tensor>& mask, int64_t kind, double beta,
                                     int64_t chunk_size) {
  p4d_check_linear(h, weight, bias, target, mask, kind, beta, chunk_size);
  P4DLinearArgs a;
  a.h = h.contiguous();
  a.weight = weight.contiguous();
  a.bias = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  a.target = target.contiguous();
  a.mask = (mask.has_value() && mask->defined()) ? mask->contiguous() : at::Tensor();
  a.kind = (kind == kP4DSmoothL1 && beta == 0) ? kP4DL1 : static_cast<int>(kind);
  a.beta = beta;
  a.chunk = chunk_size;
  return a;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> p4d_linear_forward_driver(
    const P4DLinearArgs& a, int64_t reduction, bool need_h, bool need_w, bool need_b, const P4DHostOps& ops) {
  const int64_t N = a.h.size(0), Dout = a.weight.size(0);
  const at::ScalarType acc = acc_type(a.h.scalar_type());
  const auto acc_opts = a.h.options().dtype(acc);
  TORCH_CHECK(reduction >= kP4DNone && reduction <= kP4DSum, "fused_linear_latent_loss: unknown reduction ",
              reduction);
  // Gradients are computed in forward for mean/sum; for none the backward op recomputes them
  // with the per-token grad_output.
  const bool grads_now = reduction != kP4DNone;
  at::Tensor row_loss = at::empty({N}, a.h.options().dtype(at::kDouble));
  at::Tensor valid_tokens =
      a.mask.defined() ? ops.count_true(a.mask) : at::full({}, N, a.h.options().dtype(at::kLong));
  at::Tensor count = valid_tokens.to(at::kDouble) * static_cast<double>(Dout);
  at::Tensor scale = reduction == kP4DMean ? at::reciprocal(count.clamp_min(1)).to(acc) : at::ones({}, acc_opts);
  LinearLossGrads g = linear_loss_chunks(
      a.h, a.weight, a.bias, at::Tensor(), N, a.chunk, need_h && grads_now, need_w && grads_now,
      need_b && grads_now, ops.empty, [&](at::Tensor& y, int64_t c0, int64_t len, bool write_grad) {
        ops.rows(y, a.target.narrow(0, c0, len), a.mask.defined() ? a.mask.narrow(0, c0, len) : at::Tensor(),
                 at::Tensor(), scale, a.kind, a.beta, write_grad, row_loss.narrow(0, c0, len));
      });
  at::Tensor loss;
  if (reduction == kP4DNone) {
    loss = row_loss.div(static_cast<double>(Dout > 0 ? Dout : 1)).to(acc);
  } else {
    at::Tensor total = ops.sum_f64(row_loss);
    if (reduction == kP4DMean) total = total / count.clamp_min(1);
    loss = total.to(acc);
  }
  return {loss, g.h, g.w, g.b};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> p4d_linear_backward_driver(const P4DLinearArgs& a,
                                                                                 const at::Tensor& grad_loss,
                                                                                 bool need_h, bool need_w, bool need_b,
                                                                                 const P4DHostOps& ops) {
  const int64_t N = a.h.size(0), Dout = a.weight.size(0);
  const at::ScalarType acc = acc_type(a.h.scalar_type());
  const auto acc_opts = a.h.options().dtype(acc);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == N,
              "fused_linear_latent_loss backward: grad_loss must be [N] = [", N, "], got ", grad_loss.sizes());
  if (!(need_h || need_w || (need_b && a.bias.defined()))) {
    return {at::empty({0}, a.h.options()), at::empty({0}, acc_opts), at::empty({0}, acc_opts)};
  }
  // Per-token loss = row sum / D_out: d loss_t / d y = loss' / D_out, times grad_loss[t].
  const at::Tensor row_scale = grad_loss.to(acc).contiguous();
  const at::Tensor scale = at::full({}, 1.0 / static_cast<double>(Dout > 0 ? Dout : 1), acc_opts);
  at::Tensor row_loss = at::empty({std::min(a.chunk, N)}, a.h.options().dtype(at::kDouble));
  LinearLossGrads g = linear_loss_chunks(
      a.h, a.weight, a.bias, at::Tensor(), N, a.chunk, need_h, need_w, need_b, ops.empty,
      [&](at::Tensor& y, int64_t c0, int64_t len, bool write_grad) {
        ops.rows(y, a.target.narrow(0, c0, len), a.mask.defined() ? a.mask.narrow(0, c0, len) : at::Tensor(),
                 row_scale.narrow(0, c0, len), scale, a.kind, a.beta, write_grad, row_loss.narrow(0, 0, len));
      });
  return {g.h, g.w, g.b};
}

}  // namespace rgpt4d
