// TPE CUDA kernels. Plain CUDA over raw pointers: no torch headers (quick to compile).
#include "common/cuda_utils.cuh"
#include "tpe/tpe_cuda.h"

namespace rgpt4d {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename A>
__device__ __forceinline__ A enc_value(const EncArgs& enc, int64_t bt, int64_t d) {
  if (enc.table_acc) return static_cast<const A*>(enc.table_acc)[enc.rows[bt] * enc.D + d];
  const A t = static_cast<const A*>(enc.seconds_acc)[bt];
  return tpe_value<A>(t, d, enc.D, static_cast<A>(enc.log_base));
}

// Fills e[0..D) with frame bt's encoding (shared memory), then syncs.
template <typename A>
__device__ __forceinline__ void load_frame_encoding(const EncArgs& enc, int64_t bt, A* e) {
  for (int64_t d = threadIdx.x; d < enc.D; d += blockDim.x) e[d] = enc_value<A>(enc, bt, d);
  __syncthreads();
}

// ---- tpe_add: one block per (frame, chunk of rows); the frame's encoding in shared memory ---
template <typename T, typename A>
__global__ void tpe_add_kernel(const T* x, T* out, EncArgs enc, int64_t N, int64_t rows_per_block,
                               int64_t blocks_per_frame) {
  extern __shared__ unsigned char smem_raw[];
  A* e = reinterpret_cast<A*>(smem_raw);
  const int64_t bt = blockIdx.x / blocks_per_frame;
  const int64_t n0 = (blockIdx.x % blocks_per_frame) * rows_per_block;
  const int64_t n1 = min(N, n0 + rows_per_block);
  const int64_t D = enc.D;
  load_frame_encoding<A>(enc, bt, e);
  // rows_per_block * D < 2^31 (chosen by the launcher): 32-bit index math inside a block.
  const uint32_t len = static_cast<uint32_t>(D), total = static_cast<uint32_t>((n1 - n0) * D);
  const int64_t base = (bt * N + n0) * D;
  for (uint32_t i = threadIdx.x; i < total; i += blockDim.x) {
    const uint32_t d = i % len;
    st<T, A>(out + base + i, ld<A>(x + base + i) + e[d]);
  }
}

// ---- table gradient: 32 channels x 8 row-lanes per block, fixed-order reduction -------------
template <typename T, typename A>
__global__ void tpe_table_grad_kernel(const T* __restrict__ g, const int64_t* __restrict__ rows, A* partial, A* out,
                                      int64_t N, int64_t D, int64_t dblocks, bool deterministic) {
  __shared__ A red[8][33];
  const int64_t bt = blockIdx.x / dblocks;
  const int64_t d = (blockIdx.x % dblocks) * 32 + threadIdx.x;
  A acc = 0;
  if (d < D)
    for (int64_t n = threadIdx.y; n < N; n += 8) acc += ld<A>(g + (bt * N + n) * D + d);
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || d >= D) return;
  A s = 0;
  for (int k = 0; k < 8; ++k) s += red[k][threadIdx.x];
  if (deterministic) {
    partial[bt * D + d] = s;
  } else {
    atomicAdd(out + rows[bt] * D + d, s);
  }
}

template <typename A>
__global__ void tpe_scatter_rows_kernel(const A* __restrict__ partial, const int64_t* __restrict__ rows, A* out,
                                        int64_t BT, int64_t D) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  for (int64_t bt = 0; bt < BT; ++bt) out[rows[bt] * D + d] += partial[bt * D + d];  // frames in order
}

// ---- fused TPE + window downsample + LayerNorm: one block per output token ------------------
// Loops run over window slots j (outer) and channels d (inner, one per thread): no integer
// division per element, and each slot's D channels are read coalesced.
template <typename T, typename A>
__device__ __forceinline__ const T* slot_row(const T* __restrict__ x, const DsGeom& geo, int64_t bt, int64_t o,
                                             int64_t j) {
  const int64_t s = geo.source(o, j);
  return s >= 0 ? x + (bt * geo.h * geo.w + s) * geo.D : nullptr;  // null: zero padding
}

template <typename T, typename A>
__global__ void tpe_ds_ln_fwd_kernel(const T* __restrict__ x, EncArgs enc, const A* __restrict__ weight,
                                     const A* __restrict__ bias, T* out, A* mean_out, A* rstd_out, DsGeom geo,
                                     A eps) {
  extern __shared__ unsigned char smem_raw[];
  A* e = reinterpret_cast<A*>(smem_raw);
  __shared__ A scratch[32];
  const int64_t r = blockIdx.x, M = geo.M(), K = geo.K(), D = geo.D, W2 = geo.win * geo.win;
  const int64_t bt = r / M, o = r - bt * M;
  load_frame_encoding<A>(enc, bt, e);
  A s = 0;
  for (int64_t j = 0; j < W2; ++j) {
    const T* row = slot_row<T, A>(x, geo, bt, o, j);
    if (row)
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) s += ld<A>(row + d) + e[d];
  }
  const A mean = block_sum(s, scratch) / static_cast<A>(K);
  A ss = 0;
  for (int64_t j = 0; j < W2; ++j) {
    const T* row = slot_row<T, A>(x, geo, bt, o, j);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A c = (row ? ld<A>(row + d) + e[d] : A(0)) - mean;
      ss += c * c;
    }
  }
  const A rstd = A(1) / sqrt(block_sum(ss, scratch) / static_cast<A>(K) + eps);
  for (int64_t j = 0; j < W2; ++j) {
    const T* row = slot_row<T, A>(x, geo, bt, o, j);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const int64_t k = j * D + d;
      A y = ((row ? ld<A>(row + d) + e[d] : A(0)) - mean) * rstd;
      if (weight) y *= weight[k];
      if (bias) y += bias[k];
      st<T, A>(out + r * K + k, y);
    }
  }
  if (threadIdx.x == 0) {
    mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
}

// dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)), scattered back to the source tokens.
template <typename T, typename A>
__global__ void tpe_ds_ln_dx_kernel(const T* __restrict__ g, const T* __restrict__ x, EncArgs enc,
                                    const A* __restrict__ weight, const A* __restrict__ mean_in,
                                    const A* __restrict__ rstd_in, T* grad_x, DsGeom geo) {
  extern __shared__ unsigned char smem_raw[];
  A* e = reinterpret_cast<A*>(smem_raw);
  __shared__ A scratch[32];
  const int64_t r = blockIdx.x, M = geo.M(), K = geo.K(), D = geo.D, W2 = geo.win * geo.win;
  const int64_t bt = r / M, o = r - bt * M;
  const A mean = mean_in[r], rstd = rstd_in[r];
  const T* grow = g + r * K;
  load_frame_encoding<A>(enc, bt, e);
  A s1 = 0, s2 = 0;
  for (int64_t j = 0; j < W2; ++j) {
    const T* row = slot_row<T, A>(x, geo, bt, o, j);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const int64_t k = j * D + d;
      const A xhat = ((row ? ld<A>(row + d) + e[d] : A(0)) - mean) * rstd;
      const A gw = ld<A>(grow + k) * (weight ? weight[k] : A(1));
      s1 += gw;
      s2 += gw * xhat;
    }
  }
  const A c1 = block_sum(s1, scratch) / static_cast<A>(K);
  const A c2 = block_sum(s2, scratch) / static_cast<A>(K);
  for (int64_t j = 0; j < W2; ++j) {
    const int64_t s = geo.source(o, j);
    if (s < 0) continue;  // padding: no source token
    const int64_t src = (bt * geo.h * geo.w + s) * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const int64_t k = j * D + d;
      const A xhat = (ld<A>(x + src + d) + e[d] - mean) * rstd;
      const A gw = ld<A>(grow + k) * (weight ? weight[k] : A(1));
      st<T, A>(grad_x + src + d, rstd * (gw - c1 - xhat * c2));
    }
  }
}

// Weight / bias partial sums: thread = channel k, blockIdx.y = a fixed slice of rows. The
// frame's encoding value for this channel is recomputed only when the frame changes.
template <typename T, typename A>
__global__ void tpe_ds_ln_wb_kernel(const T* __restrict__ g, const T* __restrict__ x, EncArgs enc,
                                    const A* __restrict__ mean_in, const A* __restrict__ rstd_in, A* part_w,
                                    A* part_b, DsGeom geo, int64_t rows, int64_t rows_per_split) {
  const int64_t K = geo.K(), M = geo.M();
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const int64_t j = k / geo.D, d = k - j * geo.D;
  const int64_t r0 = blockIdx.y * rows_per_split, r1 = min(rows, r0 + rows_per_split);
  A aw = 0, ab = 0, e = 0;
  int64_t cur_bt = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const A gv = ld<A>(g + r * K + k);
    ab += gv;
    if (part_w) {
      const int64_t bt = r / M, o = r - bt * M;
      if (bt != cur_bt) {
        e = enc_value<A>(enc, bt, d);
        cur_bt = bt;
      }
      const int64_t s = geo.source(o, j);
      const A v = s >= 0 ? ld<A>(x + (bt * geo.h * geo.w + s) * geo.D + d) + e : A(0);
      aw += gv * (v - mean_in[r]) * rstd_in[r];
    }
  }
  if (part_w) part_w[blockIdx.y * K + k] = aw;
  if (part_b) part_b[blockIdx.y * K + k] = ab;
}

// Shared memory per block a launch gets without opting in.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// Lets `kernel` take `dyn_bytes` of dynamic shared memory next to its static arrays: above the
// default 48 KiB (static + dynamic) the kernel must opt in (up to the device's opt-in limit,
// which tpe_max_encoding_bytes checks first).
template <typename Kernel>
cudaError_t allow_dynamic_shared(Kernel kernel, size_t dyn_bytes) {
  cudaFuncAttributes a;
  cudaError_t e = cudaFuncGetAttributes(&a, kernel);
  if (e != cudaSuccess) return e;
  if (dyn_bytes + a.sharedSizeBytes <= kDefaultSharedBytes) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn_bytes));
}

}  // namespace

int64_t tpe_max_encoding_bytes(DType dt) {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();  // clear the error: fall back to the default limit
    optin = static_cast<int>(kDefaultSharedBytes);
  }
  size_t static_bytes = 0;
  RGPT4D_DISPATCH_DTYPE(dt, {
    using A = acc_t<scalar_t>;
    const void* kernels[] = {reinterpret_cast<const void*>(&tpe_add_kernel<scalar_t, A>),
                             reinterpret_cast<const void*>(&tpe_ds_ln_fwd_kernel<scalar_t, A>),
                             reinterpret_cast<const void*>(&tpe_ds_ln_dx_kernel<scalar_t, A>)};
    for (const void* k : kernels) {
      cudaFuncAttributes a;
      if (cudaFuncGetAttributes(&a, k) == cudaSuccess) static_bytes = std::max(static_bytes, a.sharedSizeBytes);
      else cudaGetLastError();
    }
  });
  return static_cast<int64_t>(optin) - static_cast<int64_t>(static_bytes);
}

cudaError_t tpe_add_launch(DType dt, const void* x, void* out, EncArgs enc, int64_t BT, int64_t N,
                           cudaStream_t stream) {
  const int64_t D = enc.D;
  if (BT * N * D == 0) return cudaSuccess;
  const int64_t rows_per_block = std::max<int64_t>(1, 16384 / D);
  const int64_t blocks_per_frame = ceil_div(N, rows_per_block);
  RGPT4D_DISPATCH_DTYPE(dt, {
    using A = acc_t<scalar_t>;
    const cudaError_t e = allow_dynamic_shared(tpe_add_kernel<scalar_t, A>, D * sizeof(A));
    if (e != cudaSuccess) return e;
    tpe_add_kernel<scalar_t, A><<<BT * blocks_per_frame, kThreads, D * sizeof(A), stream>>>(
        static_cast<const scalar_t*>(x), static_cast<scalar_t*>(out), enc, N, rows_per_block, blocks_per_frame);
  });
  return cudaGetLastError();
}

cudaError_t tpe_table_grad_launch(DType dt, const void* grad, const int64_t* rows, void* partial_acc, void* out_acc,
                                  int64_t BT, int64_t N, int64_t D, bool deterministic, cudaStream_t stream) {
  if (BT * D == 0) return cudaSuccess;
  const int64_t dblocks = ceil_div(D, 32);
  RGPT4D_DISPATCH_DTYPE(dt, {
    using A = acc_t<scalar_t>;
    tpe_table_grad_kernel<scalar_t, A><<<BT * dblocks, dim3(32, 8), 0, stream>>>(
        static_cast<const scalar_t*>(grad), rows, static_cast<A*>(partial_acc), static_cast<A*>(out_acc), N, D,
        dblocks, deterministic);
    if (deterministic)
      tpe_scatter_rows_kernel<A><<<ceil_div(D, kThreads), kThreads, 0, stream>>>(
          static_cast<const A*>(partial_acc), rows, static_cast<A*>(out_acc), BT, D);
  });
  return cudaGetLastError();
}

cudaError_t tpe_ds_ln_fwd_launch(DType dt, const void* x, EncArgs enc, const void* weight_acc, const void* bias_acc,
                                 void* out, void* mean_acc, void* rstd_acc, DsGeom geo, int64_t BT, double eps,
                                 cudaStream_t stream) {
  const int64_t rows = BT * geo.M();
  if (rows == 0 || geo.K() == 0) return cudaSuccess;
  RGPT4D_DISPATCH_DTYPE(dt, {
    using A = acc_t<scalar_t>;
    const cudaError_t e = allow_dynamic_shared(tpe_ds_ln_fwd_kernel<scalar_t, A>, geo.D * sizeof(A));
    if (e != cudaSuccess) return e;
    tpe_ds_ln_fwd_kernel<scalar_t, A><<<rows, kThreads, geo.D * sizeof(A), stream>>>(
        static_cast<const scalar_t*>(x), enc, static_cast<const A*>(weight_acc), static_cast<const A*>(bias_acc),
        static_cast<scalar_t*>(out), static_cast<A*>(mean_acc), static_cast<A*>(rstd_acc), geo, static_cast<A>(eps));
  });
  return cudaGetLastError();
}

cudaError_t tpe_ds_ln_bwd_launch(DType dt, const void* grad_out, const void* x, EncArgs enc, const void* weight_acc,
                                 const void* mean_acc, const void* rstd_acc, void* grad_x, void* part_w_acc,
                                 void* part_b_acc, int64_t row_splits, DsGeom geo, int64_t BT, cudaStream_t stream) {
  const int64_t rows = BT * geo.M(), K = geo.K();
  if (rows == 0 || K == 0) return cudaSuccess;
  RGPT4D_DISPATCH_DTYPE(dt, {
    using A = acc_t<scalar_t>;
    const scalar_t* g = static_cast<const scalar_t*>(grad_out);
    const scalar_t* xp = static_cast<const scalar_t*>(x);
    if (grad_x) {
      const cudaError_t e = allow_dynamic_shared(tpe_ds_ln_dx_kernel<scalar_t, A>, geo.D * sizeof(A));
      if (e != cudaSuccess) return e;
      tpe_ds_ln_dx_kernel<scalar_t, A><<<rows, kThreads, geo.D * sizeof(A), stream>>>(
          g, xp, enc, static_cast<const A*>(weight_acc), static_cast<const A*>(mean_acc),
          static_cast<const A*>(rstd_acc), static_cast<scalar_t*>(grad_x), geo);
    }
    if (part_w_acc || part_b_acc) {
      const int64_t rows_per_split = ceil_div(rows, row_splits);
      tpe_ds_ln_wb_kernel<scalar_t, A><<<dim3(ceil_div(K, kThreads), row_splits), kThreads, 0, stream>>>(
          g, xp, enc, static_cast<const A*>(mean_acc), static_cast<const A*>(rstd_acc), static_cast<A*>(part_w_acc),
          static_cast<A*>(part_b_acc), geo, rows, rows_per_split);
    }
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rgpt4d
