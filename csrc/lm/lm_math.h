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

namespace rgpt4d {

// SwiGLU: y = silu(g) * u = g * sigmoid(g) * u;
//   dy/dg = u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  dy/du = silu(g).
template <typename A>
RGPT4D_HD A lm_sigmoid(A g) {
  return A(1) / (A(1) + exp(-g));
}

template <typename A>
RGPT4D_HD void swiglu_grads(A g, A u, A gy, A* dg, A* du) {
  const A s = lm_sigmoid<A>(g);
  *du = gy * g * s;
  *dg = gy * u * s * (A(1) + g * (A(1) - s));
}

}  // namespace rgpt4d
