// Language-model head ops: the CPU kernels (schema: rgpt4d/ops/lm.py).
//
//   linear_cross_entropy(h [N, D], weight [V, D], bias [V]?, target [N] int64, ignore_index,
//                        reduction, chunk_size, need_h_grad, need_w_grad, need_b_grad)
//       -> (loss [] (float32; float64 for float64 inputs), grad_h [N, D] or [0],
//           grad_w [V, D] (accumulation dtype) or [0], grad_b [V] (accumulation dtype) or [0])
//     The LM head's Linear fused with the cross-entropy of its logits (lm_common.h): only rows
//     whose target is not ignore_index are projected, chunk_size of them at a time, so the
//     [N, V] logits and their gradient never exist whole. reduction 1 mean (over the selected
//     rows; NaN when there is none, as F.cross_entropy), 2 sum. The gradients of the loss are
//     computed here, in forward; the autograd backward (rgpt4d/ops/lm.py) scales them by
//     grad_output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "lm/lm_common.h"
#include "lm/lm_math.h"

namespace rgpt4d {
namespace {

template <typename A, typename T>
inline A load(const T* p) {
  return static_cast<A>(*p);
}

// One row: loss (returned) and, when write_grad, the scaled gradient written over the logits.
template <typename T, typename A>
double lce_row(T* x, int64_t V, int64_t t, A scale, bool write_grad) {
  A m = -std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < V; ++j) m = std::max(m, load<A>(x + j));
  A s = 0;
  for (int64_t j = 0; j < V; ++j) s += std::exp(load<A>(x + j) - m);
  const A lse = m + std::log(s);
  const double loss = static_cast<double>(lse) - static_cast<double>(load<A>(x + t));
  if (write_grad) {
    for (int64_t j = 0; j < V; ++j) x[j] = static_cast<T>(lce_grad<A>(load<A>(x + j), lse, j == t) * scale);
  }
  return loss;
}

void lce_rows_cpu(at::Tensor logits, const at::Tensor& target, double scale, bool write_grad, at::Tensor row_loss) {
  const int64_t R = logits.size(0), V = logits.size(1);
  if (R == 0) return;
  TORCH_CHECK(logits.is_contiguous() && target.is_contiguous() && row_loss.is_contiguous(),
              "fused_linear_cross_entropy: internal: chunk tensors must be contiguous");
  const int64_t* tp = target.data_ptr<int64_t>();
  double* out = row_loss.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "linear_cross_entropy_rows", [&] {
    using A = acc_t<scalar_t>;
    scalar_t* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) out[r] = lce_row<scalar_t, A>(x + r * V, V, tp[r], static_cast<A>(scale), write_grad);
    });
  });
}

at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }

const LceHostOps kCpuOps{&empty_cpu, &lce_rows_cpu};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cpu(
    const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& target,
    int64_t ignore_index, int64_t reduction, int64_t chunk_size, bool need_h_grad, bool need_w_grad,
    bool need_b_grad) {
  const LceArgs a = lce_args(h, weight, bias, target, ignore_index, chunk_size);
  return lce_forward_driver(a, reduction, need_h_grad, need_w_grad, need_b_grad, kCpuOps);
}

}  // namespace

// The ops' schemas are declared in rgpt4d/ops/lm.py (rgpt4d/ops/registry.py); this file registers
// their CPU kernels.

TORCH_LIBRARY_IMPL(rgpt4d, CPU, m) { m.impl("linear_cross_entropy", &linear_cross_entropy_cpu); }

}  // namespace rgpt4d
