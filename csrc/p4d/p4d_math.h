// P4D distillation loss math, shared by the CPU and CUDA kernels.
//
// One loss element on d = pred - target (or log(pred + eps) - log(target + eps) in log space):
//   smooth_l1 (beta > 0):  |d| < beta ? 0.5 d^2 / beta : |d| - 0.5 beta   grad  clamp(d / beta, -1, 1)
//   mse:                   d^2                                             grad  2 d
//   l1:                    |d|                                             grad  sign(d)  (0 at 0, as torch)
// (smooth_l1 with beta == 0 is l1: the host maps it to kP4DL1, as F.smooth_l1_loss does.)
// In log space the gradient with respect to pred carries the chain factor 1 / (pred + eps).
//
// The gradient of the clamp form equals torch's piecewise smooth_l1 backward: for |d| >= beta,
// d / beta is beyond +-1 and clamps to sign(d); below, it is d / beta. Branch-free, so the CPU
// loops vectorise.
#pragma once

#include <type_traits>

#include "common/hd.h"

// Force-inlined on the host too: the CPU loops only vectorise if these are inlined, and GCC's
// inliner gives up on them in a translation unit with many loop instantiations.
#if defined(__CUDACC__)
#define RGPT4D_P4D_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define RGPT4D_P4D_HD inline __attribute__((always_inline))
#else
#define RGPT4D_P4D_HD inline
#endif

namespace rgpt4d {

enum P4DKind : int { kP4DSmoothL1 = 0, kP4DMSE = 1, kP4DL1 = 2 };

// Per-term flags of the p4d_loss op (an int per term).
enum P4DFlag : int { kP4DFlagLog = 1, kP4DFlagGrad = 2, kP4DFlagMask = 4 };

// Per-term constants, in the accumulation type.
template <typename A>
struct P4DConsts {
  A beta, half_beta, inv_beta;
};

template <typename A>
RGPT4D_P4D_HD P4DConsts<A> p4d_consts(int kind, double beta) {
  P4DConsts<A> c;
  const bool smooth = kind == kP4DSmoothL1 && beta > 0;
  c.beta = static_cast<A>(smooth ? beta : 1.0);
  c.half_beta = static_cast<A>(0.5) * c.beta;
  c.inv_beta = static_cast<A>(1) / c.beta;
  return c;
}

// c ? a : b. On the host a bitwise select: with GCC's default -ftrapping-math a floating-point
// conditional whose arms were computed only for it is not if-converted, and the CPU loops would
// not vectorise; integer AND/OR selects are.
template <typename A>
RGPT4D_P4D_HD A p4d_select(bool c, A a, A b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  using U = typename std::conditional<sizeof(A) == 4, uint32_t, uint64_t>::type;
  U ua, ub;
  memcpy(&ua, &a, sizeof(A));
  memcpy(&ub, &b, sizeof(A));
  const U m = U(0) - static_cast<U>(c);
  const U r = (ua & m) | (ub & ~m);
  A out;
  memcpy(&out, &r, sizeof(A));
  return out;
#endif
}

template <int KIND, typename A>
RGPT4D_P4D_HD A p4d_elem_loss(A d, const P4DConsts<A>& c) {
  const A ad = fabs(d);
  if (KIND == kP4DSmoothL1) return p4d_select(ad < c.beta, A(0.5) * d * d * c.inv_beta, ad - c.half_beta);
  if (KIND == kP4DMSE) return d * d;
  return ad;
}

template <int KIND, typename A>
RGPT4D_P4D_HD A p4d_elem_grad(A d, const P4DConsts<A>& c) {
  if (KIND == kP4DSmoothL1) {  // clamp(d / beta, -1, 1), NaN stays NaN
    const A x = d * c.inv_beta;
    return p4d_select(x < A(-1), A(-1), p4d_select(x > A(1), A(1), x));
  }
  if (KIND == kP4DMSE) return A(2) * d;
  return static_cast<A>(d > A(0)) - static_cast<A>(d < A(0));  // sign(d), 0 at 0
}

// Runtime-kind versions (the CUDA multi-tensor kernel: the kind is uniform across a block).
template <typename A>
RGPT4D_P4D_HD A p4d_loss_value(int kind, A d, const P4DConsts<A>& c) {
  if (kind == kP4DSmoothL1) return p4d_elem_loss<kP4DSmoothL1, A>(d, c);
  if (kind == kP4DMSE) return p4d_elem_loss<kP4DMSE, A>(d, c);
  return p4d_elem_loss<kP4DL1, A>(d, c);
}

template <typename A>
RGPT4D_P4D_HD A p4d_loss_grad(int kind, A d, const P4DConsts<A>& c) {
  if (kind == kP4DSmoothL1) return p4d_elem_grad<kP4DSmoothL1, A>(d, c);
  if (kind == kP4DMSE) return p4d_elem_grad<kP4DMSE, A>(d, c);
  return p4d_elem_grad<kP4DL1, A>(d, c);
}

// Gradient scale of a term, written into the gradient buffer in the forward pass:
//   f / count (reduction "mean") or f ("sum"), where f is the term's weight in the total, or 1
//   when that weight is 0 (the backward then rescales by (g_total * w + g_term) / f).
// No valid element (count 0): every element is masked, the gradient is 0 whatever the scale.
template <typename A>
RGPT4D_P4D_HD A p4d_grad_scale(double f, int64_t count, bool mean) {
  if (!mean) return static_cast<A>(f);
  return static_cast<A>(f / static_cast<double>(count > 0 ? count : 1));
}

// Mask of element e under the canonical mask layout: mask[(e / inner) % period].
RGPT4D_P4D_HD int64_t p4d_mask_index(int64_t e, int64_t inner, int64_t period) {
  return (inner == 1 ? e : e / inner) % period;
}

}  // namespace rgpt4d
