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

// ---- RMSNorm: one block per row ---------------------------------------------------------------
template <typename T, typename W, typename O, typename A>
__global__ void __launch_bounds__(kThreads) rms_fwd_kernel(const T* __restrict__ x, const W* __restrict__ w,
                                                            O* __restrict__ y, A* __restrict__ rstd, int64_t D,
                                                            A eps) {
  __shared__ A scratch[32];
  const int64_t r = blockIdx.x;
  const T* xr = x + r * D;
  A ss = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const A v = ld<A>(xr + d);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const A rs = A(1) / sqrt(ss / A(D > 0 ? D : 1) + eps);
  if (threadIdx.x == 0) rstd[r] = rs;
  O* yr = y + r * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    T n;
    st<T, A>(&n, ld<A>(xr + d) * rs);  // rounded to x's dtype, as Qwen2RMSNorm
    st<O, A>(yr + d, ld<A>(w + d) * ld<A>(&n));
  }
}

template <typename G, typename T, typename W, typename A>
__global__ void __launch_bounds__(kThreads) rms_bwd_kernel(const G* __restrict__ gy, const T* __restrict__ x,
                                                            const W* __restrict__ w, const A* __restrict__ rstd,
                                                            T* __restrict__ gx, int64_t D) {
  __shared__ A scratch[32];
  const int64_t r = blockIdx.x;
  const G* gr = gy + r * D;
  const T* xr = x + r * D;
  const A rs = rstd[r];
  A dot = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dot += ld<A>(gr + d) * ld<A>(w + d) * ld<A>(xr + d);
  dot = block_sum(dot, scratch);
  const A c = dot * rs * rs / A(D > 0 ? D : 1);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    st<T, A>(gx + r * D + d, rs * (ld<A>(gr + d) * ld<A>(w + d) - ld<A>(xr + d) * c));
}

// ---- SwiGLU: elementwise ---------------------------------------------------------------------
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) swiglu_fwd_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                                               T* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const A gv = ld<A>(g + i);
    T s;
    st<T, A>(&s, gv * lm_sigmoid<A>(gv));  // silu rounded to the dtype, then the product (as F.silu(g) * u)
    st<T, A>(y + i, ld<A>(&s) * ld<A>(u + i));
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) swiglu_bwd_kernel(const T* __restrict__ gy, const T* __restrict__ g,
                                                               const T* __restrict__ u, T* __restrict__ dg,
                                                               T* __restrict__ du, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A a, b;
    swiglu_grads<A>(ld<A>(g + i), ld<A>(u + i), ld<A>(gy + i), &a, &b);
    st<T, A>(dg + i, a);
    st<T, A>(du + i, b);
  }
}

// ---- RoPE: one thread per (row, i < D/2) pair ------------------------------------------------
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) rope_kernel(const T* __restrict__ x, const T* __restrict__ cs,
                                                         const T* __restrict__ sn, T* __restrict__ o, RopeShape sh,
                                                         bool backward) {
  const int64_t h = sh.D / 2;
  const int64_t total = sh.B * sh.H * sh.L * h;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e % h, r = e / h, l = r % sh.L, bh = r / sh.L, hh = bh % sh.H, b = bh / sh.H;
    const T* xr = x + b * sh.xs[0] + hh * sh.xs[1] + l * sh.xs[2];
    T* orow = o + b * sh.os[0] + hh * sh.os[1] + l * sh.os[2];
    const int64_t base = ((sh.Bc == 1 ? 0 : b) * sh.L + l) * sh.D;
    const A x1 = ld<A>(xr + i), x2 = ld<A>(xr + i + h);
    const A c1 = ld<A>(cs + base + i), c2 = ld<A>(cs + base + i + h);
    const A s1 = ld<A>(sn + base + i), s2 = ld<A>(sn + base + i + h);
    if (backward) {
      st<T, A>(orow + i, x1 * c1 + x2 * s2);
      st<T, A>(orow + i + h, x2 * c2 - x1 * s1);
    } else {
      st<T, A>(orow + i, x1 * c1 - x2 * s1);
      st<T, A>(orow + i + h, x2 * c2 + x1 * s2);
    }
  }
}

template <typename F>
cudaError_t with_type(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

// float32 and the 16-bit types (float32 arithmetic); float64 is only paired with float64.
template <typename F>
cudaError_t with_low_type(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat16: return f(__half{});
    default: return cudaErrorInvalidValue;
  }
}

unsigned elementwise_blocks(int64_t n) {
  const int64_t b = ceil_div(n, kThreads);
  return static_cast<unsigned>(b < 65535 ? b : 65535);
}

}  // namespace

cudaError_t rms_norm_fwd_launch(DType xdt, DType wdt, DType ydt, const void* x, const void* w, void* y, void* rstd,
                                int64_t N, int64_t D, double eps, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (N > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (xdt == DType::kFloat64 || wdt == DType::kFloat64 || ydt == DType::kFloat64) {
    if (xdt != DType::kFloat64 || wdt != DType::kFloat64 || ydt != DType::kFloat64) return cudaErrorInvalidValue;
    rms_fwd_kernel<double, double, double, double><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        static_cast<const double*>(x), static_cast<const double*>(w), static_cast<double*>(y),
        static_cast<double*>(rstd), D, eps);
    return cudaGetLastError();
  }
  return with_low_type(xdt, [&](auto xt) {
    return with_low_type(wdt, [&](auto wt) {
      return with_low_type(ydt, [&](auto yt) -> cudaError_t {
        using T = decltype(xt);
        using W = decltype(wt);
        using O = decltype(yt);
        rms_fwd_kernel<T, W, O, float><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const W*>(w), static_cast<O*>(y), static_cast<float*>(rstd), D,
            static_cast<float>(eps));
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t rms_norm_bwd_launch(DType gdt, DType xdt, DType wdt, const void* gy, const void* x, const void* w,
                                const void* rstd, void* gx, int64_t N, int64_t D, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (N > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (xdt == DType::kFloat64 || wdt == DType::kFloat64 || gdt == DType::kFloat64) {
    if (xdt != DType::kFloat64 || wdt != DType::kFloat64 || gdt != DType::kFloat64) return cudaErrorInvalidValue;
    rms_bwd_kernel<double, double, double, double><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        static_cast<const double*>(gy), static_cast<const double*>(x), static_cast<const double*>(w),
        static_cast<const double*>(rstd), static_cast<double*>(gx), D);
    return cudaGetLastError();
  }
  return with_low_type(gdt, [&](auto gt) {
    return with_low_type(xdt, [&](auto xt) {
      return with_low_type(wdt, [&](auto wt) -> cudaError_t {
        using G = decltype(gt);
        using T = decltype(xt);
        using W = decltype(wt);
        rms_bwd_kernel<G, T, W, float><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
            static_cast<const G*>(gy), static_cast<const T*>(x), static_cast<const W*>(w),
            static_cast<const float*>(rstd), static_cast<T*>(gx), D);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t swiglu_fwd_launch(DType dt, const void* g, const void* u, void* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return with_type(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    swiglu_fwd_kernel<T, acc_t<T>><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(y), n);
    return cudaGetLastError();
  });
}

cudaError_t swiglu_bwd_launch(DType dt, const void* gy, const void* g, const void* u, void* dg, void* du, int64_t n,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return with_type(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    swiglu_bwd_kernel<T, acc_t<T>><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        static_cast<const T*>(gy), static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(dg),
        static_cast<T*>(du), n);
    return cudaGetLastError();
  });
}

cudaError_t rope_launch(DType dt, const void* x, const void* cos, const void* sin, void* out, RopeShape shape,
                        bool backward, cudaStream_t stream) {
  const int64_t total = shape.B * shape.H * shape.L * (shape.D / 2);
  if (total == 0) return cudaSuccess;
  return with_type(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    rope_kernel<T, acc_t<T>><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(cos), static_cast<const T*>(sin), static_cast<T*>(out), shape,
        backward);
    return cudaGetLastError();
  });
}

cudaError_t lce_rows_launch(DType xdt, void* logits, const int64_t* target, int64_t R, int64_t V, double scale,
                            bool write_grad, double* row_loss, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  if (R > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  RGPT4D_DISPATCH_DTYPE(xdt, {
    using A = acc_t<scalar_t>;
    lce_rows_kernel<scalar_t, A><<<static_cast<unsigned>(R), kThreads, 0, stream>>>(
        static_cast<scalar_t*>(logits), target, V, static_cast<A>(scale), write_grad, row_loss);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rgpt4d
