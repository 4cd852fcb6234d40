// Row math of the fused linear + cross-entropy, shared by the CPU loops and the CUDA kernels
// (host and device): for one row of logits x[0..V) with target t,
//   lse = m + log(sum_j exp(x_j - m)),  m = max_j x_j
//   loss = lse - x_t
//   dloss/dx_j = softmax_j - [j == t] = exp(x_j - lse) - [j == t]
#pragma once

#include "common/hd.h"

namespace rgpt4d {

// Reductions of the linear cross-entropy op (the schema's `reduction` int).
constexpr int kLceMean = 1;
constexpr int kLceSum = 2;

template <typename A>
RGPT4D_HD A lce_grad(A x, A lse, bool is_target) {
  return exp(x - lse) - (is_target ? A(1) : A(0));
}

}  // namespace rgpt4d
