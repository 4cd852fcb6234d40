// P4D loss CUDA kernels. Plain CUDA over raw pointers: no torch headers (quick to compile).
//
// Determinism: each block of the multi-tensor kernel owns a fixed tile of one term and reduces
// it in a fixed order (block_sum); the finalize kernel sums the tiles of each term in order.
// No atomics, so the losses are bitwise repeatable.
#include "common/cuda_utils.cuh"
#include "p4d/p4d_cuda.h"

namespace rgpt4d {
namespace cuda {
namespace {

constexpr int kThreads = 256;
static_assert(kP4DTile % kThreads == 0, "a tile is a whole number of block-wide steps");

// ---- p4d_loss: every term in one launch ------------------------------------------------------
template <typename P, typename T, typename A>
__global__ void __launch_bounds__(kThreads) p4d_terms_kernel(P4DTermTable table, int64_t block0,
                                                              const int64_t* __restrict__ counts, bool mean,
                                                              A log_eps, double* __restrict__ partial) {
  __shared__ A scratch[32];
  const int64_t blk = block0 + static_cast<int64_t>(blockIdx.x);
  int i = 0;
  while (i + 1 < table.n && blk >= table.t[i + 1].first_block) ++i;
  const P4DTermDesc& d = table.t[i];
  const P4DConsts<A> c = p4d_consts<A>(d.kind, d.beta);
  const A scale = p4d_grad_scale<A>(d.grad_factor, counts[d.index], mean);
  const P* __restrict__ p = static_cast<const P*>(d.pred);
  const T* __restrict__ t = static_cast<const T*>(d.target);
  P* g = static_cast<P*>(d.grad);
  const bool has_mask = d.flags & kP4DFlagMask, log_space = d.flags & kP4DFlagLog;
  const bool same_shape_mask = d.inner == 1 && d.period == d.numel;  // no 64-bit division per element
  const bool want_grad = (d.flags & kP4DFlagGrad) && g != nullptr;
  const int64_t base = (blk - d.first_block) * kP4DTile;
  A acc = 0;
#pragma unroll 4
  for (int k = 0; k < kP4DTile / kThreads; ++k) {
    const int64_t e = base + k * kThreads + threadIdx.x;  // consecutive threads, consecutive elements
    if (e >= d.numel) break;
    A pv = ld<A>(p + e), tv = ld<A>(t + e), chain = 1;
    const bool ok = !has_mask || d.mask[same_shape_mask ? e : p4d_mask_index(e, d.inner, d.period)] != 0;
    if (log_space) {
      const A pe = pv + log_eps;
      chain = A(1) / pe;
      pv = log(pe);
      tv = log(tv + log_eps);
    }
    const A diff = pv - tv;
    if (ok) acc += p4d_loss_value<A>(d.kind, diff, c);
    if (want_grad) st<P, A>(g + e, ok ? p4d_loss_grad<A>(d.kind, diff, c) * scale * chain : A(0));
  }
  const A s = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[blk] = static_cast<double>(s);
}

template <typename O>
__global__ void __launch_bounds__(kThreads) p4d_finalize_kernel(const double* __restrict__ partial,
                                                                 const int64_t* __restrict__ ranges,
                                                                 const int64_t* __restrict__ counts,
                                                                 const double* __restrict__ weights, int n, bool mean,
                                                                 O* losses, O* total) {
  __shared__ double scratch[32];
  double tot = 0;
  for (int i = 0; i < n; ++i) {
    double s = 0;
    for (int64_t b = ranges[2 * i] + threadIdx.x; b < ranges[2 * i + 1]; b += blockDim.x) s += partial[b];
    s = block_sum(s, scratch);
    const int64_t cnt = counts[i];
    const double v = cnt > 0 ? (mean ? s / static_cast<double>(cnt) : s) : 0.0;
    if (threadIdx.x == 0) {
      losses[i] = static_cast<O>(v);
      tot += weights[i] * v;  // term order
    }
  }
  if (threadIdx.x == 0) *total = static_cast<O>(tot);
}

// ---- fused linear loss: one block per projected row ------------------------------------------
template <typename Y, typename T, typename A>
__global__ void __launch_bounds__(kThreads) p4d_rows_kernel(Y* y, const T* __restrict__ target,
                                                             const uint8_t* __restrict__ mask,
                                                             const A* __restrict__ row_scale,
                                                             const A* __restrict__ scale, int64_t D, int kind,
                                                             double beta, bool write_grad, double* row_loss) {
  __shared__ A scratch[32];
  const int64_t r = blockIdx.x;
  Y* yr = y + r * D;
  const T* tr = target + r * D;
  if (mask && !mask[r]) {
    if (write_grad)
      for (int64_t k = threadIdx.x; k < D; k += blockDim.x) st<Y, A>(yr + k, A(0));
    if (threadIdx.x == 0) row_loss[r] = 0.0;
    return;
  }
  const P4DConsts<A> c = p4d_consts<A>(kind, beta);
  const A rs = scale[0] * (row_scale ? row_scale[r] : A(1));
  A acc = 0;
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    const A diff = ld<A>(yr + k) - ld<A>(tr + k);
    acc += p4d_loss_value<A>(kind, diff, c);
    if (write_grad) st<Y, A>(yr + k, p4d_loss_grad<A>(kind, diff, c) * rs);  // each element read before written
  }
  const A s = block_sum(acc, scratch);
  if (threadIdx.x == 0) row_loss[r] = static_cast<double>(s);
}

// (pred/y dtype, target dtype) pairs: float64 only with float64 (the binding converts the
// target otherwise); the 16-bit and float32 types in any combination, in float32.
template <typename F>
cudaError_t dispatch_pair(DType a, DType b, F&& f) {
  auto with_b = [&](auto tag_a) -> cudaError_t {
    using TA = decltype(tag_a);
    switch (b) {
      case DType::kFloat32: return f(TA{}, float{});
      case DType::kBFloat16: return f(TA{}, __nv_bfloat16{});
      case DType::kFloat16: return f(TA{}, __half{});
      default: return cudaErrorInvalidValue;
    }
  };
  switch (a) {
    case DType::kFloat64:
      return b == DType::kFloat64 ? f(double{}, double{}) : cudaErrorInvalidValue;
    case DType::kFloat32: return b == DType::kFloat64 ? cudaErrorInvalidValue : with_b(float{});
    case DType::kBFloat16: return b == DType::kFloat64 ? cudaErrorInvalidValue : with_b(__nv_bfloat16{});
    case DType::kFloat16: return b == DType::kFloat64 ? cudaErrorInvalidValue : with_b(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t p4d_terms_launch(DType pdt, DType tdt, const P4DTermTable& table, int64_t block0, int64_t nblocks,
                             const int64_t* counts, bool mean, double log_eps, double* partial, cudaStream_t stream) {
  if (nblocks == 0 || table.n == 0) return cudaSuccess;
  if (nblocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return dispatch_pair(pdt, tdt, [&](auto p_tag, auto t_tag) -> cudaError_t {
    using P = decltype(p_tag);
    using T = decltype(t_tag);
    using A = acc_t<P>;
    p4d_terms_kernel<P, T, A><<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(
        table, block0, counts, mean, static_cast<A>(log_eps), partial);
    return cudaGetLastError();
  });
}

cudaError_t p4d_finalize_launch(const double* partial, const int64_t* ranges, const int64_t* counts,
                                const double* weights, int n, bool mean, bool out_double, void* losses, void* total,
                                cudaStream_t stream) {
  if (out_double) {
    p4d_finalize_kernel<double><<<1, kThreads, 0, stream>>>(partial, ranges, counts, weights, n, mean,
                                                            static_cast<double*>(losses), static_cast<double*>(total));
  } else {
    p4d_finalize_kernel<float><<<1, kThreads, 0, stream>>>(partial, ranges, counts, weights, n, mean,
                                                           static_cast<float*>(losses), static_cast<float*>(total));
  }
  return cudaGetLastError();
}

cudaError_t p4d_rows_launch(DType ydt, DType tdt, void* y, const void* target, const uint8_t* mask,
                            const void* row_scale, const void* scale, int64_t R, int64_t D, int kind, double beta,
                            bool write_grad, double* row_loss, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  if (R > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return dispatch_pair(ydt, tdt, [&](auto y_tag, auto t_tag) -> cudaError_t {
    using Y = decltype(y_tag);
    using T = decltype(t_tag);
    using A = acc_t<Y>;
    p4d_rows_kernel<Y, T, A><<<static_cast<unsigned>(R), kThreads, 0, stream>>>(
        static_cast<Y*>(y), static_cast<const T*>(target), mask, static_cast<const A*>(row_scale),
        static_cast<const A*>(scale), D, kind, beta, write_grad, row_loss);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace rgpt4d
