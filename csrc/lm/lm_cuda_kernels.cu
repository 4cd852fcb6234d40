// Fused linear + cross-entropy CUDA kernel: the row part (logsumexp, loss, gradient in place).
// Plain CUDA over raw pointers: no torch headers (quick to compile). One block per row; fixed
// reduction order, no atomics: deterministic.
#include <float.h>

#include "common/cuda_utils.cuh"
#include "lm/lm_cuda.h"
#include "lm/lm_math.h"

namespace rgpt4d {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename A> __device__ __forceinline__ A warp_max(A v) {
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Max over the block; every thread gets the result. `scratch` holds 32 values.
template <typename A> __device__ __forceinline__ A block_max(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A r = (lane < nwarps) ? scratch[lane] : -A(INFINITY);
  return warp_max(r);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) lce_rows_kernel(T* x, const int64_t* __restrict__ target, int64_t V,
                                                             A scale, bool write_grad, double* row_loss) {
  __shared__ A scratch[32];
  const int64_t r = blockIdx.x;
  T* xr = x + r * V;
  const int64_t t = target[r];
  A m = -A(INFINITY);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = max(m, ld<A>(xr + j));
  m = block_max(m, scratch);
  A s = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) s += exp(ld<A>(xr + j) - m);
  s = block_sum(s, scratch);
  const A lse = m + log(s);
  // every thread has read x_t's row values it needs for the sums; x_t itself is read before any write
  const A xt = ld<A>(xr + t);
  __syncthreads();
  if (threadIdx.x == 0) row_loss[r] = static_cast<double>(lse) - static_cast<double>(xt);
  if (write_grad)
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) st<T, A>(xr + j, lce_grad<A>(ld<A>(xr + j), lse, j == t) * scale);
}

}  // namespace

cudaError_t lce_rows_launch(DType xdt, void* logits, const int64_t* target, int64_t R, int64_t V, double scale,
                            bool write_grad, double* row_loss, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  if (R > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  RGPT4D_DISPATCH_DTYPE(xdt, {
    using A = typename AccOf<scalar_t>::type;
    lce_rows_kernel<scalar_t, A><<<static_cast<unsigned>(R), kThreads, 0, stream>>>(
        static_cast<scalar_t*>(logits), target, V, static_cast<A>(scale), write_grad, row_loss);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rgpt4d
