// Regional pooling CUDA kernels. Plain CUDA over raw pointers: no torch headers (quick to compile).
// The RoI and resize math is regional_math.h, shared with the CPU kernels.
#include "common/cuda_utils.cuh"
#include "regional/regional_cuda.h"
#include "regional/regional_math.h"

namespace rgpt4d {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename A>
__device__ __forceinline__ A enc_at(const EncArgs& enc, int64_t frame, int64_t d) {
  if (enc.table_acc) return static_cast<const A*>(enc.table_acc)[enc.rows[frame] * enc.D + d];
  const A t = static_cast<const A*>(enc.seconds_acc)[frame];
  return tpe_value<A>(t, d, enc.D, static_cast<A>(enc.log_base));
}

__device__ __forceinline__ int64_t image_base(const PoolArgs& pa, int64_t img) {
  return (img / pa.img_inner) * pa.s_outer + (img % pa.img_inner) * pa.s_inner;
}

template <typename A>
__device__ __forceinline__ RoiGeom<A> geometry(const A* boxes, int64_t k, const PoolArgs& pa) {
  const A* b = boxes + 4 * k;
  return roi_geometry<A>(b[0], b[1], b[2], b[3], static_cast<A>(pa.spatial_scale), pa.aligned, pa.ph, pa.pw,
                         pa.sampling_ratio);
}

// Splits a flat element index of the [C, P] output tile of one RoI into (channel, bin): channel
// fastest for channels-last maps (coalesced reads), bin fastest otherwise (coalesced writes).
__device__ __forceinline__ void split_cq(int64_t e, int64_t C, int64_t P, bool c_fast, int64_t* c, int64_t* q) {
  if (c_fast) {
    *q = e / C;
    *c = e - *q * C;
  } else {
    *c = e / P;
    *q = e - *c * P;
  }
}

// ---- RoI pooling: forward. grid.x = RoI, threads stride over its C x P outputs ------------------
template <typename T, typename A>
__global__ void roi_pool_fwd_kernel(const T* __restrict__ feat, const A* __restrict__ boxes,
                                    const int64_t* __restrict__ roi_img, EncArgs enc, PoolArgs pa, T* out) {
  const int64_t k = blockIdx.x;
  const int64_t C = pa.C, P = pa.ph * pa.pw;
  const int64_t img = roi_img[k];
  const bool ok = img >= 0 && img < pa.images;
  RoiGeom<A> g = geometry<A>(boxes, k, pa);
  if (!ok) g.grid_h = g.grid_w = 0;
  const T* base = feat + (ok ? image_base(pa, img) : 0);
  const bool c_fast = pa.sC == 1;
  for (int64_t e = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; e < C * P;
       e += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    int64_t c, q;
    split_cq(e, C, P, c_fast, &c, &q);
    const int64_t i = q / pa.pw, j = q - (q / pa.pw) * pa.pw;
    const T* plane = base + c * pa.sC;
    A acc = 0;
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      const AxisTap<A> ty = roi_axis_tap<A>(roi_sample_coord<A>(g.y0, g.bin_h, i, iy, g.grid_h), pa.H);
      if (!ty.valid) continue;
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        const AxisTap<A> tx = roi_axis_tap<A>(roi_sample_coord<A>(g.x0, g.bin_w, j, ix, g.grid_w), pa.W);
        if (!tx.valid) continue;
        acc += ty.w_lo * (tx.w_lo * ld<A>(plane + ty.lo * pa.sH + tx.lo * pa.sW) +
                          tx.w_hi * ld<A>(plane + ty.lo * pa.sH + tx.hi * pa.sW)) +
               ty.w_hi * (tx.w_lo * ld<A>(plane + ty.hi * pa.sH + tx.lo * pa.sW) +
                          tx.w_hi * ld<A>(plane + ty.hi * pa.sH + tx.hi * pa.sW));
      }
    }
    acc *= g.inv_count;
    if (ok && enc.D > 0) acc += enc_at<A>(enc, img, c);
    st<T, A>(out + (k * C + c) * P + q, acc);
  }
}

// ---- RoI pooling: backward with float atomics ------------------------------------------------
template <typename T, typename A>
__global__ void roi_pool_bwd_atomic_kernel(const T* __restrict__ grad, const A* __restrict__ boxes,
                                           const int64_t* __restrict__ roi_img, PoolArgs pa, A* gbuf) {
  const int64_t k = blockIdx.x;
  const int64_t C = pa.C, P = pa.ph * pa.pw;
  const int64_t img = roi_img[k];
  if (img < 0 || img >= pa.images) return;
  const RoiGeom<A> g = geometry<A>(boxes, k, pa);
  A* base = gbuf + image_base(pa, img);
  const bool c_fast = pa.sC == 1;
  for (int64_t e = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; e < C * P;
       e += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    int64_t c, q;
    split_cq(e, C, P, c_fast, &c, &q);
    const int64_t i = q / pa.pw, j = q - (q / pa.pw) * pa.pw;
    const A gq = ld<A>(grad + (k * C + c) * P + q) * g.inv_count;
    A* plane = base + c * pa.sC;
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      const AxisTap<A> ty = roi_axis_tap<A>(roi_sample_coord<A>(g.y0, g.bin_h, i, iy, g.grid_h), pa.H);
      if (!ty.valid) continue;
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        const AxisTap<A> tx = roi_axis_tap<A>(roi_sample_coord<A>(g.x0, g.bin_w, j, ix, g.grid_w), pa.W);
        if (!tx.valid) continue;
        atomicAdd(plane + ty.lo * pa.sH + tx.lo * pa.sW, gq * ty.w_lo * tx.w_lo);
        atomicAdd(plane + ty.lo * pa.sH + tx.hi * pa.sW, gq * ty.w_lo * tx.w_hi);
        atomicAdd(plane + ty.hi * pa.sH + tx.lo * pa.sW, gq * ty.w_hi * tx.w_lo);
        atomicAdd(plane + ty.hi * pa.sH + tx.hi * pa.sW, gq * ty.w_hi * tx.w_hi);
      }
    }
  }
}

// ---- RoI pooling: deterministic backward (regional_math.h: entries sorted by target pixel) --------
// Samples per RoI (0 for a skipped RoI).
template <typename A>
__global__ void roi_sample_counts_kernel(const A* __restrict__ boxes, const int64_t* __restrict__ roi_img, int64_t K,
                                         PoolArgs pa, int64_t* counts) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < K;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t img = roi_img[k];
    const RoiGeom<A> g = geometry<A>(boxes, k, pa);
    counts[k] = (img >= 0 && img < pa.images) ? g.grid_h * g.grid_w * pa.ph * pa.pw : 0;
  }
}

// Block = RoI k: the entries of its samples in the pass's sample range [s_lo, s_hi), at 4 (sample - s_lo).
template <typename A>
__global__ void roi_entries_kernel(const A* __restrict__ boxes, const int64_t* __restrict__ roi_img,
                                   const int64_t* __restrict__ first, int64_t K, int64_t s_lo, int64_t s_hi, PoolArgs pa,
                                   int64_t* keys, int64_t* rows, A* w) {
  const int64_t npix = pa.images * pa.H * pa.W, P = pa.ph * pa.pw;
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const int64_t img = roi_img[k];
    if (img < 0 || img >= pa.images) continue;
    const RoiGeom<A> g = geometry<A>(boxes, k, pa);
    const int64_t f = first[k], n = g.grid_h * g.grid_w * P;
    const int64_t a = (f > s_lo ? f : s_lo) - f, b = (f + n < s_hi ? f + n : s_hi) - f;
    for (int64_t s = a + threadIdx.x; s < b; s += blockDim.x) {
      const int64_t e = 4 * (f + s - s_lo);
      roi_sample_entries<A>(g, s, pa.pw, pa.H, pa.W, img, npix, keys + e, w + e);
      const int64_t row = k * P + roi_sample_index(s, g.grid_h, g.grid_w).q;
      rows[e] = rows[e + 1] = rows[e + 2] = rows[e + 3] = row;
    }
  }
}

// Thread = (pixel, channel) of the gradient, its only writer: the pixel's sorted entries
// start[p] .. start[p + 1] summed in order. gt = grad as [K * P, C] (a gradient row's channels
// contiguous). Channel fastest: the lanes of a warp read the same entries (one broadcast load) and
// one gradient row (coalesced); planar buffers take strided stores, merged in the L2.
template <typename T, typename A>
__global__ void roi_segment_sum_kernel(const int64_t* __restrict__ start, const int64_t* __restrict__ rows,
                                       const A* __restrict__ w, const T* __restrict__ gt, PoolArgs pa, bool accumulate,
                                       A* gbuf) {
  const int64_t HW = pa.H * pa.W, npix = pa.images * HW, C = pa.C;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < npix * C;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = e / C, c = e - p * C;
    const int64_t img = p / HW, yx = p - img * HW, y = yx / pa.W, x = yx - y * pa.W;
    A* dst = gbuf + image_base(pa, img) + c * pa.sC + y * pa.sH + x * pa.sW;
    A acc = accumulate ? *dst : A(0);
    for (int64_t i = start[p]; i < start[p + 1]; ++i) acc += w[i] * ld<A>(gt + rows[i] * C + c);
    *dst = acc;
  }
}

// ---- mask pooling --------------------------------------------------------------------------------
// One block per mask: resized values and 1 / (sum + eps) (fixed-order block reduction).
template <typename A>
__global__ void mask_resize_kernel(const A* __restrict__ masks, MaskArgs ma, A eps, A* mt, A* invz) {
  __shared__ A scratch[32];
  const int64_t m = blockIdx.x, HW = ma.H * ma.W;
  const A* src = masks + m * ma.Hm * ma.Wm;
  A s = 0;
  for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) {
    const int64_t y = p / ma.W, x = p - (p / ma.W) * ma.W;
    const ResizeTap<A> a = resize_axis_tap<A>(y, ma.Hm, ma.H);
    const ResizeTap<A> b = resize_axis_tap<A>(x, ma.Wm, ma.W);
    const A v = a.w_lo * (b.w_lo * src[a.lo * ma.Wm + b.lo] + b.w_hi * src[a.lo * ma.Wm + b.hi]) +
                a.w_hi * (b.w_lo * src[a.hi * ma.Wm + b.lo] + b.w_hi * src[a.hi * ma.Wm + b.hi]);
    mt[m * HW + p] = v;
    s += v;
  }
  const A total = block_sum(s, scratch);
  if (threadIdx.x == 0) invz[m] = A(1) / (total + eps);
}

constexpr int kRegionTile = 8;  // regions per thread in the pooling kernel (features read once per tile)

// One (frame, channel, tile of kRegionTile regions from r0) of the pooling.
template <typename T, typename A>
__device__ __forceinline__ void mask_pool_fwd_tile(const T* __restrict__ feat, const A* __restrict__ mt,
                                                   const A* __restrict__ invz, const EncArgs& enc, const MaskArgs& ma,
                                                   int64_t bt, int64_t c, int64_t r0, T* out) {
  if (c >= ma.C) return;
  const int64_t HW = ma.H * ma.W, nr = min(static_cast<int64_t>(kRegionTile), ma.R - r0);
  const T* plane = feat + (bt / ma.T) * ma.s0 + (bt % ma.T) * ma.s1 + c * ma.sC;
  const A* m = mt + (bt * ma.R + r0) * HW;
  A acc[kRegionTile];
#pragma unroll
  for (int r = 0; r < kRegionTile; ++r) acc[r] = 0;
  for (int64_t p = 0; p < HW; ++p) {
    const int64_t y = p / ma.W, x = p - (p / ma.W) * ma.W;
    const A f = ld<A>(plane + y * ma.sH + x * ma.sW);
#pragma unroll
    for (int r = 0; r < kRegionTile; ++r)
      if (r < nr) acc[r] += m[r * HW + p] * f;
  }
  const A e = enc.D > 0 ? enc_at<A>(enc, bt, c) : A(0);
  for (int r = 0; r < nr; ++r) {
    const int64_t mi = bt * ma.R + r0 + r;
    st<T, A>(out + mi * ma.C + c, acc[r] * invz[mi] + e);
  }
}

// grid = (frame, channel tiles, region tiles), y and z capped at grid_rows (regional_math.h) and
// strided; thread = one channel, kRegionTile accumulators.
template <typename T, typename A>
__global__ void mask_pool_fwd_kernel(const T* __restrict__ feat, const A* __restrict__ mt,
                                     const A* __restrict__ invz, EncArgs enc, MaskArgs ma, T* out) {
  const int64_t bt = blockIdx.x;
  for (int64_t cb = blockIdx.y; cb * blockDim.x < ma.C; cb += gridDim.y)
    for (int64_t r0 = static_cast<int64_t>(blockIdx.z) * kRegionTile; r0 < ma.R;
         r0 += static_cast<int64_t>(gridDim.z) * kRegionTile)
      mask_pool_fwd_tile<T, A>(feat, mt, invz, enc, ma, bt, cb * blockDim.x + threadIdx.x, r0, out);
}

// thread = one (channel, pixel) of grad_f: sum over regions.
template <typename T, typename A>
__global__ void mask_pool_dfeat_kernel(const A* __restrict__ gn, const A* __restrict__ mt, MaskArgs ma, T* gf) {
  const int64_t HW = ma.H * ma.W, n = ma.C * HW;
  const bool c_fast = ma.sC == 1;
  for (int64_t bt = blockIdx.y; bt < ma.B * ma.T; bt += gridDim.y)
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t c, p;
    split_cq(e, ma.C, HW, c_fast, &c, &p);
    A acc = 0;
    for (int64_t r = 0; r < ma.R; ++r) acc += mt[(bt * ma.R + r) * HW + p] * gn[(bt * ma.R + r) * ma.C + c];
    const int64_t y = p / ma.W, x = p - (p / ma.W) * ma.W;
    st<T, A>(gf + (bt / ma.T) * ma.s0 + (bt % ma.T) * ma.s1 + c * ma.sC + y * ma.sH + x * ma.sW, acc);
  }
}

// thread = one (region, pixel): GF = sum over channels of gn * f.
template <typename T, typename A>
__global__ void mask_pool_gf_kernel(const A* __restrict__ gn, const T* __restrict__ feat, MaskArgs ma, A* gfr) {
  const int64_t HW = ma.H * ma.W, n = ma.R * HW;
  for (int64_t bt = blockIdx.y; bt < ma.B * ma.T; bt += gridDim.y)
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / HW, p = e - (e / HW) * HW;
    const int64_t y = p / ma.W, x = p - (p / ma.W) * ma.W;
    const T* pix = feat + (bt / ma.T) * ma.s0 + (bt % ma.T) * ma.s1 + y * ma.sH + x * ma.sW;
    const A* g = gn + (bt * ma.R + r) * ma.C;
    A acc = 0;
    for (int64_t c = 0; c < ma.C; ++c) acc += g[c] * ld<A>(pix + c * ma.sC);
    gfr[(bt * ma.R + r) * HW + p] = acc;
  }
}

// thread = one source pixel of one mask: gathers the resized pixels that read it.
template <typename A>
__global__ void mask_resize_transpose_kernel(const A* __restrict__ gfr, const A* __restrict__ s, MaskArgs ma,
                                             A* gm) {
  const int64_t HWm = ma.Hm * ma.Wm, HW = ma.H * ma.W;
  for (int64_t m = blockIdx.y; m < ma.B * ma.T * ma.R; m += gridDim.y)
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < HWm;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t sy = q / ma.Wm, sx = q - (q / ma.Wm) * ma.Wm;
    int64_t y0, y1, x0, x1;
    resize_axis_candidates(sy, ma.Hm, ma.H, &y0, &y1);
    resize_axis_candidates(sx, ma.Wm, ma.W, &x0, &x1);
    const A sm = s[m];
    A acc = 0;
    for (int64_t y = y0; y <= y1; ++y) {
      const ResizeTap<A> a = resize_axis_tap<A>(y, ma.Hm, ma.H);
      const A wy = (a.lo == sy ? a.w_lo : A(0)) + (a.hi == sy ? a.w_hi : A(0));
      if (wy == A(0)) continue;
      for (int64_t x = x0; x <= x1; ++x) {
        const ResizeTap<A> b = resize_axis_tap<A>(x, ma.Wm, ma.W);
        const A wx = (b.lo == sx ? b.w_lo : A(0)) + (b.hi == sx ? b.w_hi : A(0));
        if (wx == A(0)) continue;
        acc += wy * wx * (gfr[m * HW + y * ma.W + x] - sm);
      }
    }
    gm[m * HWm + q] = acc;
  }
}

int grid_y_for(int64_t elems, int64_t blocks_x) {
  // enough blocks along y to cover `elems` per x-block with kThreads threads, bounded
  const int64_t want = ceil_div(elems, kThreads);
  const int64_t cap = blocks_x >= 1024 ? 1 : std::max<int64_t>(1, 4096 / std::max<int64_t>(blocks_x, 1));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, std::min<int64_t>(cap, 65535))));
}

}  // namespace

cudaError_t roi_pool_fwd_launch(DType dt, const void* feat, const void* boxes_acc, const int64_t* roi_img,
                                EncArgs enc, int64_t K, PoolArgs pa, void* out, cudaStream_t stream) {
  const int64_t elems = pa.C * pa.ph * pa.pw;
  if (K == 0 || elems == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(K), grid_y_for(elems, K));
  RGPT4D_DISPATCH_DTYPE(dt, {
    using A = acc_t<scalar_t>;
    roi_pool_fwd_kernel<scalar_t, A><<<grid, kThreads, 0, stream>>>(static_cast<const scalar_t*>(feat),
                                                                     static_cast<const A*>(boxes_acc), roi_img, enc, pa,
                                                                     static_cast<scalar_t*>(out));
  });
  return cudaGetLastError();
}

cudaError_t roi_pool_bwd_launch(DType dt, const void* grad, const void* boxes_acc, const int64_t* roi_img, int64_t K,
                                PoolArgs pa, void* gbuf_acc, cudaStream_t stream) {
  const int64_t elems = pa.C * pa.ph * pa.pw;
  if (K == 0 || elems == 0 || pa.images == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(K), grid_y_for(elems, K));
  RGPT4D_DISPATCH_DTYPE(dt, {
    using A = acc_t<scalar_t>;
    roi_pool_bwd_atomic_kernel<scalar_t, A><<<grid, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad), static_cast<const A*>(boxes_acc), roi_img, pa, static_cast<A*>(gbuf_acc));
  });
  return cudaGetLastError();
}

cudaError_t roi_sample_counts_launch(bool fp64, const void* boxes_acc, const int64_t* roi_img, int64_t K, PoolArgs pa,
                                     int64_t* counts, cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(K, kThreads), 4096));
  if (fp64) {
    roi_sample_counts_kernel<double><<<blocks, kThreads, 0, stream>>>(static_cast<const double*>(boxes_acc), roi_img, K,
                                                                      pa, counts);
  } else {
    roi_sample_counts_kernel<float><<<blocks, kThreads, 0, stream>>>(static_cast<const float*>(boxes_acc), roi_img, K,
                                                                     pa, counts);
  }
  return cudaGetLastError();
}

cudaError_t roi_entries_launch(bool fp64, const void* boxes_acc, const int64_t* roi_img, const int64_t* first,
                               int64_t K, int64_t s_lo, int64_t s_hi, PoolArgs pa, int64_t* keys, int64_t* rows,
                               void* w_acc, cudaStream_t stream) {
  if (K == 0 || s_hi <= s_lo) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(K, 1 << 20));
  if (fp64) {
    roi_entries_kernel<double><<<blocks, kThreads, 0, stream>>>(static_cast<const double*>(boxes_acc), roi_img, first, K,
                                                                s_lo, s_hi, pa, keys, rows, static_cast<double*>(w_acc));
  } else {
    roi_entries_kernel<float><<<blocks, kThreads, 0, stream>>>(static_cast<const float*>(boxes_acc), roi_img, first, K,
                                                               s_lo, s_hi, pa, keys, rows, static_cast<float*>(w_acc));
  }
  return cudaGetLastError();
}

cudaError_t roi_segment_sum_launch(DType dt, const int64_t* start, const int64_t* rows, const void* w_acc,
                                   const void* gt, PoolArgs pa, bool accumulate, void* gbuf_acc, cudaStream_t stream) {
  const int64_t n = pa.images * pa.H * pa.W * pa.C;
  if (n == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kThreads), 1 << 20));
  RGPT4D_DISPATCH_DTYPE(dt, {
    using A = acc_t<scalar_t>;
    roi_segment_sum_kernel<scalar_t, A><<<blocks, kThreads, 0, stream>>>(
        start, rows, static_cast<const A*>(w_acc), static_cast<const scalar_t*>(gt), pa, accumulate,
        static_cast<A*>(gbuf_acc));
  });
  return cudaGetLastError();
}

cudaError_t mask_resize_launch(DType dt, const void* masks_acc, MaskArgs ma, double eps, void* mt_acc, void* invz_acc,
                               cudaStream_t stream) {
  const int64_t n = ma.B * ma.T * ma.R;
  if (n == 0) return cudaSuccess;
  if (dt == DType::kFloat64) {
    mask_resize_kernel<double><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        static_cast<const double*>(masks_acc), ma, eps, static_cast<double*>(mt_acc), static_cast<double*>(invz_acc));
  } else {
    mask_resize_kernel<float><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        static_cast<const float*>(masks_acc), ma, static_cast<float>(eps), static_cast<float*>(mt_acc),
        static_cast<float*>(invz_acc));
  }
  return cudaGetLastError();
}

cudaError_t mask_pool_fwd_launch(DType dt, const void* feat, const void* mt_acc, const void* invz_acc, EncArgs enc,
                                 MaskArgs ma, void* out, cudaStream_t stream) {
  const int64_t BT = ma.B * ma.T;
  if (BT * ma.R == 0 || ma.C == 0) return cudaSuccess;
  constexpr int kChan = 128;
  const dim3 grid(static_cast<unsigned>(BT), static_cast<unsigned>(grid_rows(ceil_div(ma.C, kChan))),
                  static_cast<unsigned>(grid_rows(ceil_div(ma.R, kRegionTile))));
  RGPT4D_DISPATCH_DTYPE(dt, {
    using A = acc_t<scalar_t>;
    mask_pool_fwd_kernel<scalar_t, A><<<grid, kChan, 0, stream>>>(static_cast<const scalar_t*>(feat),
                                                                   static_cast<const A*>(mt_acc),
                                                                   static_cast<const A*>(invz_acc), enc, ma,
                                                                   static_cast<scalar_t*>(out));
  });
  return cudaGetLastError();
}

cudaError_t mask_pool_dfeat_launch(DType dt, const void* gn_acc, const void* mt_acc, MaskArgs ma, void* grad_f,
                                   cudaStream_t stream) {
  const int64_t BT = ma.B * ma.T, n = ma.C * ma.H * ma.W;
  if (BT == 0 || n == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kThreads), 4096)),
                  static_cast<unsigned>(grid_rows(BT)));
  RGPT4D_DISPATCH_DTYPE(dt, {
    using A = acc_t<scalar_t>;
    mask_pool_dfeat_kernel<scalar_t, A><<<grid, kThreads, 0, stream>>>(
        static_cast<const A*>(gn_acc), static_cast<const A*>(mt_acc), ma, static_cast<scalar_t*>(grad_f));
  });
  return cudaGetLastError();
}

cudaError_t mask_pool_gf_launch(DType dt, const void* gn_acc, const void* feat, MaskArgs ma, void* gfr_acc,
                                cudaStream_t stream) {
  const int64_t BT = ma.B * ma.T, n = ma.R * ma.H * ma.W;
  if (BT == 0 || n == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kThreads), 4096)),
                  static_cast<unsigned>(grid_rows(BT)));
  RGPT4D_DISPATCH_DTYPE(dt, {
    using A = acc_t<scalar_t>;
    mask_pool_gf_kernel<scalar_t, A><<<grid, kThreads, 0, stream>>>(
        static_cast<const A*>(gn_acc), static_cast<const scalar_t*>(feat), ma, static_cast<A*>(gfr_acc));
  });
  return cudaGetLastError();
}

cudaError_t mask_resize_transpose_launch(DType dt, const void* gfr_acc, const void* s_acc, MaskArgs ma,
                                         void* grad_masks_acc, cudaStream_t stream) {
  const int64_t n = ma.B * ma.T * ma.R, q = ma.Hm * ma.Wm;
  if (n == 0 || q == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(q, kThreads), 4096)),
                  static_cast<unsigned>(grid_rows(n)));
  if (dt == DType::kFloat64) {
    mask_resize_transpose_kernel<double><<<grid, kThreads, 0, stream>>>(
        static_cast<const double*>(gfr_acc), static_cast<const double*>(s_acc), ma, static_cast<double*>(grad_masks_acc));
  } else {
    mask_resize_transpose_kernel<float><<<grid, kThreads, 0, stream>>>(
        static_cast<const float*>(gfr_acc), static_cast<const float*>(s_acc), ma, static_cast<float*>(grad_masks_acc));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rgpt4d
