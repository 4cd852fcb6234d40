// Regional pooling ops: the CPU kernels (schemas: rgpt4d/ops/regional.py).
//
//   roi_align(input[N,C,H,W], rois[K,5], spatial_scale, ph, pw, sampling_ratio, aligned) -> [K,C,ph,pw]
//   roi_align_backward(grad[K,C,ph,pw], rois, spatial_scale, ph, pw, sampling_ratio, aligned,
//                      N, H, W, channels_last, deterministic)          -> grad_input [N,C,H,W]
//   region_pool(features[B,T,C,H,W], boxes[B,T,R,4], valid[B,T,R]?, timestamps[B,T]?, table[L,C]?,
//               spatial_scale, ph, pw, sampling_ratio, aligned, base)  -> [B,T,R,C,ph,pw]
//   region_pool_backward(grad[B,T,R,C,ph,pw], boxes, valid?, spatial_scale, ph, pw, sampling_ratio,
//                        aligned, H, W, channels_last, deterministic)  -> grad_features [B,T,C,H,W]
//   mask_pool(features[B,T,C,H,W], masks[B,T,R,Hm,Wm], timestamps?, table?, eps, base)
//                      -> (out [B,T,R,C], resized [B,T,R,H,W], inv_z [B,T,R])
//   mask_pool_backward(grad[B,T,R,C], features, masks, resized, inv_z, need_features_grad,
//                      need_masks_grad, channels_last) -> (grad_features or [0], grad_masks or [0])
// resized and inv_z (accumulation dtype: the masks resized to the feature grid and 1 / (sum + eps))
// are outputs of the forward only so that the backward need not resize the masks again.
//
// Features are read in place when their channels (channels-last) or their rows (planar) are
// contiguous, whatever the batch/frame strides; grad_features comes back contiguous, or
// channels-last when channels_last=True. The RoI math is in regional_math.h. The CPU kernels are
// deterministic: the backward gives each task a disjoint slice of the gradient (one image x a
// channel range) and adds the RoIs in a fixed order; no atomics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/runtime.h"
#include "regional/regional_common.h"
#include "regional/regional_cpu_loops.h"
#include "regional/regional_math.h"
#include "tpe/tpe_common.h"
#include "tpe/tpe_math.h"

namespace rgpt4d {
namespace {

// ---- channel-row primitives: generic templates, with vectorised float / bf16 overloads ------
template <typename S, typename A>
inline void axpy(A a, const S* x, A* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a * static_cast<A>(x[i]);
}
inline void axpy(float a, const float* x, float* acc, int64_t n) { cpu::rg_axpy_f32(a, x, acc, n); }
inline void axpy(float a, const c10::BFloat16* x, float* acc, int64_t n) {
  cpu::rg_axpy_bf16(a, reinterpret_cast<const uint16_t*>(x), acc, n);
}

template <typename S, typename A>
inline A dot(const A* a, const S* x, int64_t n) {
  A s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * static_cast<A>(x[i]);
  return s;
}
inline float dot(const float* a, const float* x, int64_t n) { return cpu::dot_f32(a, x, n); }
inline float dot(const float* a, const c10::BFloat16* x, int64_t n) {
  return cpu::rg_dot_bf16(a, reinterpret_cast<const uint16_t*>(x), n);
}

template <typename S, typename A>
inline A gather_dot(const S* base, const int64_t* off, const A* w, int64_t n) {
  A s = 0;
  for (int64_t i = 0; i < n; ++i) s += w[i] * static_cast<A>(base[off[i]]);
  return s;
}
inline float gather_dot(const float* base, const int64_t* off, const float* w, int64_t n) {
  return cpu::rg_gather_dot_f32(base, off, w, n);
}
inline float gather_dot(const c10::BFloat16* base, const int64_t* off, const float* w, int64_t n) {
  return cpu::rg_gather_dot_bf16(reinterpret_cast<const uint16_t*>(base), off, w, n);
}

// out[j] = sum over a rows x cols window of p[y * sP + x] * planes[j][y * sH + x], j < 4 (generic,
// float, bf16); see rg_patch_dots4.
template <typename S, typename A>
inline void patch_dots4(const A* p, int64_t sP, const S* const* planes, int64_t sH, int64_t rows, int64_t cols,
                        A* out) {
  for (int j = 0; j < 4; ++j) {
    A s = 0;
    for (int64_t y = 0; y < rows; ++y)
      for (int64_t x = 0; x < cols; ++x) s += p[y * sP + x] * static_cast<A>(planes[j][y * sH + x]);
    out[j] = s;
  }
}
inline void patch_dots4(const float* p, int64_t sP, const float* const* planes, int64_t sH, int64_t rows,
                        int64_t cols, float* out) {
  cpu::rg_patch_dots4_f32(p, sP, planes, sH, rows, cols, out);
}
inline void patch_dots4(const float* p, int64_t sP, const c10::BFloat16* const* planes, int64_t sH, int64_t rows,
                        int64_t cols, float* out) {
  cpu::rg_patch_dots4_bf16(p, sP, reinterpret_cast<const uint16_t* const*>(planes), sH, rows, cols, out);
}

// acc[c] += sum over a < ny, b < nx of (wy[a] * yscale * wx[b]) * base[yidx[a] * ys + xidx[b] * xs + c], c < len:
// one RoI cell over channels-last pixels (generic, float, bf16); see rg_cell_taps.
template <typename S, typename A>
inline void cell_taps(const S* base, const int64_t* yidx, int64_t ys, const A* wy, A yscale, int64_t ny,
                      const int64_t* xidx, int64_t xs, const A* wx, int64_t nx, int64_t len, A* acc) {
  for (int64_t a = 0; a < ny; ++a) {
    const A wa = wy[a] * yscale;
    for (int64_t b = 0; b < nx; ++b) {
      const A w = wa * wx[b];
      const S* p = base + yidx[a] * ys + xidx[b] * xs;
      for (int64_t c = 0; c < len; ++c) acc[c] += w * static_cast<A>(p[c]);
    }
  }
}
inline void cell_taps(const float* base, const int64_t* yidx, int64_t ys, const float* wy, float yscale, int64_t ny,
                      const int64_t* xidx, int64_t xs, const float* wx, int64_t nx, int64_t len, float* acc) {
  cpu::rg_cell_taps_f32(base, yidx, ys, wy, yscale, ny, xidx, xs, wx, nx, len, acc);
}
inline void cell_taps(const c10::BFloat16* base, const int64_t* yidx, int64_t ys, const float* wy, float yscale,
                      int64_t ny, const int64_t* xidx, int64_t xs, const float* wx, int64_t nx, int64_t len,
                      float* acc) {
  cpu::rg_cell_taps_bf16(reinterpret_cast<const uint16_t*>(base), yidx, ys, wy, yscale, ny, xidx, xs, wx, nx, len, acc);
}

// One row of a channels-last band against its y-tap's pw cells (generic, float); see rg_band_row.
template <typename A>
inline void band_row(const A* row, A wy, const int64_t* xstart, const int64_t* xidx, const A* wx, int64_t pw,
                     int64_t len, A* acc) {
  const int64_t zero = 0;
  for (int64_t j = 0; j < pw; ++j)
    cell_taps(row, &zero, 0, &wy, A(1), 1, xidx + xstart[j], len, wx + xstart[j], xstart[j + 1] - xstart[j], len,
              acc + j * len);
}
inline void band_row(const float* row, float wy, const int64_t* xstart, const int64_t* xidx, const float* wx,
                     int64_t pw, int64_t len, float* acc) {
  cpu::rg_band_row_f32(row, wy, xstart, xidx, wx, pw, len, acc);
}

// A channel slice of planar rows, transposed to channels-last in the accumulation dtype
// (generic, float, bf16); see rg_transpose_band.
template <typename S, typename A>
inline void transpose_band(const S* src, int64_t sC, int64_t sH, int64_t rows, int64_t W, int64_t len, A* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < len; ++c)
      for (int64_t x = 0; x < W; ++x) dst[(r * W + x) * len + c] = static_cast<A>(src[c * sC + r * sH + x]);
}
inline void transpose_band(const float* src, int64_t sC, int64_t sH, int64_t rows, int64_t W, int64_t len, float* dst) {
  cpu::rg_transpose_band_f32(src, sC, sH, rows, W, len, dst);
}
inline void transpose_band(const c10::BFloat16* src, int64_t sC, int64_t sH, int64_t rows, int64_t W, int64_t len,
                           float* dst) {
  cpu::rg_transpose_band_bf16(reinterpret_cast<const uint16_t*>(src), sC, sH, rows, W, len, dst);
}

// o[c * P + q] = a[q * len + c] + e[c] (e may be null), converted to the output dtype (generic, float).
template <typename A, typename S>
inline void cells_to_planar(const A* a, int64_t P, int64_t len, const A* e, S* o) {
  for (int64_t c = 0; c < len; ++c)  // contiguous stores; the strided reads stay in cache
    for (int64_t q = 0; q < P; ++q) o[c * P + q] = static_cast<S>(a[q * len + c] + (e ? e[c] : A(0)));
}
inline void cells_to_planar(const float* a, int64_t P, int64_t len, const float* e, float* o) {
  cpu::rg_cells_to_planar_f32(a, P, len, e, o);
}

// plane[y, x] += coef * m[y, x] over the window w (both with row stride W).
template <typename A>
inline void window_axpy(A coef, const A* m, A* plane, int64_t W, const cpu::RgWindow& w) {
  for (int64_t y = w.y0; y < w.y1; ++y)
    for (int64_t x = w.x0; x < w.x1; ++x) plane[y * W + x] += coef * m[y * W + x];
}
inline void window_axpy(float coef, const float* m, float* plane, int64_t W, const cpu::RgWindow& w) {
  cpu::rg_window_axpy_f32(coef, m, plane, W, w);
}

// y = v + e (e may be null), converted to the output dtype.
template <typename A, typename S>
inline void store(const A* v, const A* e, S* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<S>(v[i] + (e ? e[i] : A(0)));
}
inline void store(const float* v, const float* e, float* y, int64_t n) { cpu::rg_store_f32(v, e, y, n); }
inline void store(const float* v, const float* e, c10::BFloat16* y, int64_t n) {
  cpu::rg_store_bf16(v, e, reinterpret_cast<uint16_t*>(y), n);
}

int64_t num_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// Below about this many multiply-adds a parallel region costs more than it saves (waking the
// thread pool takes tens of microseconds, and far more when the cores are shared).
constexpr double kSerialWork = 1 << 17;

// fn(begin, end) over [0, n) like at::parallel_for, but the range is handed out in small pieces
// (about 8 per thread) from a shared counter (dynamic scheduling): RoIs of very different sizes do
// not hold the others up. The pieces run on elastic_for (cpu/parallel.h), not on an OpenMP
// team: the caller never waits at a barrier for a thread the OS has descheduled (on a machine
// shared with busy processes, every at::parallel_for region would wait for the busy core); it runs
// the pieces itself when no helper comes. Every task writes its
// own outputs in a fixed order, so the result does not depend on which thread runs it. Serial when
// total_work is small. fn allocates its scratch once per piece.
template <typename F>
void parallel_tasks(int64_t n, double total_work, const F& fn) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(num_threads(), n);
  if (threads <= 1 || total_work < kSerialWork || at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  const int64_t step = std::max<int64_t>(1, (n + 8 * threads - 1) / (8 * threads));
  const int64_t pieces = (n + step - 1) / step;
  elastic_for(pieces, static_cast<int>(threads), [&](int64_t piece, int) {
    fn(piece * step, std::min(n, (piece + 1) * step));
  });
}

// Channel chunks per work item so that `items` items give every thread a few tasks, with at
// least `min_chunk` channels per task (vector width).
int64_t channel_chunks(int64_t items, int64_t C, int64_t min_chunk = 16) {
  if (items <= 0 || C <= 0) return 1;
  const int64_t want = (4 * num_threads() + items - 1) / items;
  const int64_t most = std::max<int64_t>(1, (C + min_chunk - 1) / min_chunk);
  return std::max<int64_t>(1, std::min(want, most));
}

// ---- RoI taps ----------------------------------------------------------------------------------
// For each output cell along one axis: the merged taps (pixel index, summed bilinear weight) of
// the cell's samples, in increasing pixel order. See regional_math.h.
template <typename A>
struct AxisTaps {
  std::vector<int64_t> start{0};  // cells + 1 offsets into idx / w
  std::vector<int64_t> idx;
  std::vector<A> w;
  std::vector<A> scratch;

  void build(A origin, A bin, int64_t grid, int64_t cells, int64_t size) {
    start.assign(1, 0);
    idx.clear();
    w.clear();
    // at most min(2 * grid, size) taps per cell: one allocation each, not one per doubling
    const int64_t most = std::max<int64_t>(0, std::min<int64_t>(2 * grid, size));
    start.reserve(cells + 1);
    idx.reserve(cells * most);
    w.reserve(cells * most);
    scratch.reserve(std::max<int64_t>(size, 0));
    for (int64_t cell = 0; cell < cells; ++cell) {
      int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
      for (int64_t s = 0; s < grid; ++s) {
        const AxisTap<A> t = roi_axis_tap<A>(roi_sample_coord<A>(origin, bin, cell, s, grid), size);
        if (!t.valid) continue;
        lo = std::min(lo, t.lo);
        hi = std::max(hi, t.hi);
      }
      if (hi >= lo) {
        scratch.assign(hi - lo + 1, A(0));
        for (int64_t s = 0; s < grid; ++s) {
          const AxisTap<A> t = roi_axis_tap<A>(roi_sample_coord<A>(origin, bin, cell, s, grid), size);
          if (!t.valid) continue;
          scratch[t.lo - lo] += t.w_lo;
          scratch[t.hi - lo] += t.w_hi;
        }
        for (int64_t q = 0; q <= hi - lo; ++q) {
          if (scratch[q] != A(0)) {
            idx.push_back(lo + q);
            w.push_back(scratch[q]);
          }
        }
      }
      start.push_back(static_cast<int64_t>(idx.size()));
    }
  }
};

struct PoolShape {
  int64_t C, H, W, ph, pw, sampling_ratio;
  bool aligned;
  double spatial_scale;
};

template <typename A>
struct RoiTaps {
  AxisTaps<A> y, x;
  A inv_count = A(1);

  // box: x1, y1, x2, y2 (unscaled).
  void build(const A* box, const PoolShape& ps) {
    const RoiGeom<A> g = roi_geometry<A>(box[0], box[1], box[2], box[3], static_cast<A>(ps.spatial_scale), ps.aligned,
                                         ps.ph, ps.pw, ps.sampling_ratio);
    inv_count = g.inv_count;
    y.build(g.y0, g.bin_h, g.grid_h, ps.ph, ps.H);
    x.build(g.x0, g.bin_w, g.grid_w, ps.pw, ps.W);
  }

  // Flattened 2D taps of every output cell for a planar map with row stride sH: cell q has taps
  // [cell[q], cell[q+1]) of (off, w), w including 1 / count.
  std::vector<int64_t> cell, off;
  std::vector<A> w2;
  void flatten(int64_t ph, int64_t pw, int64_t sH) {
    cell.assign(1, 0);
    off.clear();
    w2.clear();
    for (int64_t i = 0; i < ph; ++i) {
      for (int64_t j = 0; j < pw; ++j) {
        for (int64_t a = y.start[i]; a < y.start[i + 1]; ++a)
          for (int64_t b = x.start[j]; b < x.start[j + 1]; ++b) {
            off.push_back(y.idx[a] * sH + x.idx[b]);
            w2.push_back(y.w[a] * x.w[b] * inv_count);
          }
        cell.push_back(static_cast<int64_t>(off.size()));
      }
    }
  }

  // Dense weight patches of every output cell, for the planar patch loop: cell q reads the window
  // pwin[q] (widened to whole vectors) with the weights patch[pstart[q] ...] (row stride: the
  // window's width), w including 1 / count. A cell without taps has an empty window.
  std::vector<A> patch;
  std::vector<int64_t> pstart;
  std::vector<cpu::RgWindow> pwin;
  void build_patches(int64_t ph, int64_t pw, int64_t W) {
    patch.clear();
    pstart.clear();
    pwin.clear();
    for (int64_t i = 0; i < ph; ++i) {
      for (int64_t j = 0; j < pw; ++j) {
        pstart.push_back(static_cast<int64_t>(patch.size()));
        if (y.start[i] == y.start[i + 1] || x.start[j] == x.start[j + 1]) {
          pwin.push_back(cpu::RgWindow{0, 0, 0, 0});
          continue;
        }
        const cpu::RgWindow w = cpu::rg_vector_window(
            {y.idx[y.start[i]], y.idx[y.start[i + 1] - 1] + 1, x.idx[x.start[j]], x.idx[x.start[j + 1] - 1] + 1}, W);
        pwin.push_back(w);
        const int64_t cols = w.x1 - w.x0;
        patch.resize(patch.size() + (w.y1 - w.y0) * cols, A(0));
        A* p = patch.data() + pstart.back();
        for (int64_t a = y.start[i]; a < y.start[i + 1]; ++a)
          for (int64_t b = x.start[j]; b < x.start[j + 1]; ++b)
            p[(y.idx[a] - w.y0) * cols + (x.idx[b] - w.x0)] = y.w[a] * x.w[b] * inv_count;
      }
    }
  }
};

// Rough count of the taps a RoI needs (work estimates; the choice of the planar loop).
template <typename A>
double estimate_taps(const A* box, const PoolShape& ps) {
  const RoiGeom<A> g = roi_geometry<A>(box[0], box[1], box[2], box[3], static_cast<A>(ps.spatial_scale), ps.aligned,
                                       ps.ph, ps.pw, ps.sampling_ratio);
  const double ty = std::min<double>(2.0 * g.grid_h, std::abs(static_cast<double>(g.bin_h)) + 2.0);
  const double tx = std::min<double>(2.0 * g.grid_w, std::abs(static_cast<double>(g.bin_w)) + 2.0);
  return static_cast<double>(ps.ph * ps.pw) * ty * tx;
}

// ---- the RoI pooling problem, shared by roi_align and region_pool ------------------------------
// K RoIs with boxes [K, 4] (accumulation dtype), each on image roi_img[k] (or -1: skipped, zero
// output); image i of the features starts at element img_off[i]. enc (optional, [images, C]) is
// added to every output cell of a non-skipped RoI (the fused TPE of region_pool).
template <typename A>
struct RoiProblem {
  PoolShape ps;
  int64_t K, images;
  const A* boxes;
  const int64_t* roi_img;
  const int64_t* img_off;
  const A* enc;
  double taps = 0;  // estimated taps of all RoIs (work estimates and the layout choice)
};

// All RoIs' taps, built once (in parallel), and the RoIs grouped by image in RoI order.
template <typename A>
struct RoiPlan {
  std::vector<RoiTaps<A>> taps;       // per RoI (empty for skipped RoIs)
  std::vector<int64_t> start, order;  // RoIs of image i: order[start[i] .. start[i+1])

  explicit RoiPlan(const RoiProblem<A>& pb) : taps(pb.K), start(pb.images + 1, 0), order(pb.K) {
    parallel_tasks(pb.K, 50.0 * pb.K * (pb.ps.ph + pb.ps.pw), [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k)
        if (pb.roi_img[k] >= 0) taps[k].build(pb.boxes + 4 * k, pb.ps);
    });
    for (int64_t k = 0; k < pb.K; ++k)
      if (pb.roi_img[k] >= 0) ++start[pb.roi_img[k] + 1];
    for (int64_t i = 0; i < pb.images; ++i) start[i + 1] += start[i];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t k = 0; k < pb.K; ++k)
      if (pb.roi_img[k] >= 0) order[fill[pb.roi_img[k]]++] = k;
  }

  // The flattened 2D taps of every RoI, for the scalar planar loops (row stride sH).
  void flatten(const RoiProblem<A>& pb, int64_t sH) {
    parallel_tasks(pb.K, 4.0 * pb.taps, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k)
        if (pb.roi_img[k] >= 0) taps[k].flatten(pb.ps.ph, pb.ps.pw, sH);
    });
  }
};

// ---- banded loops for planar maps ---------------------------------------------------------------
// A planar map ([C, H, W], rows contiguous) gives one channel of a pixel per load, so every tap
// would be a scalar gather. Instead, rows are taken a band at a time, a channel slice of the band
// is transposed into a small channels-last buffer that stays in cache, and each y-tap that reads a
// row of the band applies its x-taps as vectors over the channel slice. The map is read once, with
// no full-size copy.
template <typename A>
struct RowJob {
  int64_t row;   // map row the y-tap reads
  int64_t slot;  // the RoI's position among its image's RoIs
  int64_t k;     // the RoI
  int64_t i;     // its output row
  A wy;          // y weight / count
};

template <typename A>
struct BandPlan {
  int64_t chunk, band_rows, nbands;
  std::vector<std::vector<RowJob<A>>> jobs;      // per image, by band (RoI order inside a band)
  std::vector<std::vector<int64_t>> band_start;  // per image: jobs of band b in [band_start[b], band_start[b+1])
  double touched_rows = 0;                       // rows in bands with jobs, over all images

  BandPlan(const RoiProblem<A>& pb, const RoiPlan<A>& plan) {
    const PoolShape& ps = pb.ps;
    const int64_t C = ps.C, images = pb.images;
    // Slices of at most 64 channels (the band stays in cache), at least 32 where the threads need
    // more tasks (one vector block of the tap loops: narrower slices pay each tap's bookkeeping for
    // fewer channels), two tasks per thread when there are few images (dynamic scheduling).
    const int64_t threads = num_threads();
    const int64_t want = threads > 1 ? (2 * threads + images - 1) / images : 1;
    int64_t nchunks = std::max<int64_t>((C + 63) / 64, std::min<int64_t>(want, C / 32));
    chunk = (C + nchunks - 1) / nchunks;
    band_rows = std::max<int64_t>(1, std::min<int64_t>(ps.H, (192 << 10) / std::max<int64_t>(1, ps.W * chunk *
                                                                                             sizeof(A))));
    nbands = (ps.H + band_rows - 1) / band_rows;
    jobs.resize(images);
    band_start.resize(images);
    std::vector<double> touched(images, 0.0);
    parallel_tasks(images, 20.0 * pb.taps, [&](int64_t b0, int64_t b1) {
      std::vector<RowJob<A>> all;
      for (int64_t img = b0; img < b1; ++img) {
        all.clear();
        int64_t njobs = 0;
        for (int64_t n = plan.start[img]; n < plan.start[img + 1]; ++n)
          njobs += plan.taps[plan.order[n]].y.start.back();
        all.reserve(njobs);
        for (int64_t n = plan.start[img]; n < plan.start[img + 1]; ++n) {
          const int64_t k = plan.order[n];
          const RoiTaps<A>& t = plan.taps[k];
          for (int64_t i = 0; i < ps.ph; ++i)
            for (int64_t a = t.y.start[i]; a < t.y.start[i + 1]; ++a)
              all.push_back({t.y.idx[a], n - plan.start[img], k, i, t.y.w[a] * t.inv_count});
        }
        std::vector<int64_t>& st = band_start[img];
        st.assign(nbands + 1, 0);
        for (const auto& j : all) ++st[j.row / band_rows + 1];
        for (int64_t b = 0; b < nbands; ++b) {
          if (st[b + 1] > 0) touched[img] += static_cast<double>(std::min(ps.H, (b + 1) * band_rows) - b * band_rows);
          st[b + 1] += st[b];
        }
        std::vector<int64_t> fill(st.begin(), st.end() - 1);
        jobs[img].resize(all.size());
        for (const auto& j : all) jobs[img][fill[j.row / band_rows]++] = j;
      }
    });
    for (double t : touched) touched_rows += t;
  }
};

// The banded loops pay a transposed element per pixel of the touched rows (~3.4 ns per channel
// here: the map is read from memory) plus a cheap vector lane per tap (~0.1 ns); the scalar planar
// loop pays a scalar gather per tap (~1 ns). Forward break-even: ~4 taps per touched pixel (the
// detector case has ~9, the 4D-RGPT case ~1.5-2). The backward writes every pixel either way (the
// scalar loop zero-fills first), so bands win from ~1 tap per pixel (benchmarks/bench_regional.py).
constexpr double kBandedTapsPerPixelForward = 4.0;
constexpr double kBandedTapsPerPixelBackward = 1.0;

template <typename A>
bool prefer_banded(const RoiProblem<A>& pb, const BandPlan<A>& bp, double taps_per_pixel) {
  return pb.taps > taps_per_pixel * bp.touched_rows * static_cast<double>(pb.ps.W);
}

template <typename S, typename A>
void roi_pool_forward_banded(const S* feat, const FeatLayout& lay, const RoiProblem<A>& pb, const RoiPlan<A>& plan,
                             const BandPlan<A>& bp, S* out) {
  const PoolShape& ps = pb.ps;
  const int64_t C = ps.C, P = ps.ph * ps.pw, W = ps.W, chunk = bp.chunk;
  const int64_t nchunks = (C + chunk - 1) / chunk;
  parallel_tasks(pb.images * nchunks, (pb.taps + bp.touched_rows * W) * C, [&](int64_t begin, int64_t end) {
    std::vector<A> acc, band(bp.band_rows * W * chunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t img = task / nchunks, c0 = (task % nchunks) * chunk, len = std::min(chunk, C - c0);
      const int64_t nk = plan.start[img + 1] - plan.start[img];
      if (nk == 0 || len <= 0) continue;
      acc.assign(nk * P * len, A(0));
      const S* base = feat + pb.img_off[img] + c0 * lay.sC;
      const std::vector<RowJob<A>>& jobs = bp.jobs[img];
      const std::vector<int64_t>& st = bp.band_start[img];
      for (int64_t b = 0; b < bp.nbands; ++b) {
        if (st[b] == st[b + 1]) continue;
        const int64_t r0 = b * bp.band_rows, r1 = std::min(ps.H, r0 + bp.band_rows);
        transpose_band(base + r0 * lay.sH, lay.sC, lay.sH, r1 - r0, W, len, band.data());
        for (int64_t u = st[b]; u < st[b + 1]; ++u) {
          const RowJob<A>& job = jobs[u];
          const RoiTaps<A>& t = plan.taps[job.k];
          band_row(band.data() + (job.row - r0) * W * len, job.wy, t.x.start.data(), t.x.idx.data(), t.x.w.data(),
                   ps.pw, len, acc.data() + (job.slot * P + job.i * ps.pw) * len);
        }
      }
      for (int64_t n = plan.start[img]; n < plan.start[img + 1]; ++n) {
        const int64_t k = plan.order[n], slot = n - plan.start[img];
        const A* e = pb.enc ? pb.enc + img * C + c0 : nullptr;
        S* o = out + (k * C + c0) * P;
        const A* a = acc.data() + slot * P * len;
        cells_to_planar(a, P, len, e, o);
      }
    }
  });
}

// grad_buf: planar [images, C, H, W] contiguous, uninitialised; every element is written.
template <typename S, typename A>
void roi_pool_backward_banded(const S* grad, const FeatLayout& lay, const RoiProblem<A>& pb, const RoiPlan<A>& plan,
                              const BandPlan<A>& bp, A* grad_buf) {
  const PoolShape& ps = pb.ps;
  const int64_t C = ps.C, P = ps.ph * ps.pw, W = ps.W, chunk = bp.chunk;
  const int64_t nchunks = (C + chunk - 1) / chunk;
  parallel_tasks(pb.images * nchunks, (pb.taps + pb.images * ps.H * W) * C, [&](int64_t begin, int64_t end) {
    std::vector<A> gacc, band(bp.band_rows * W * chunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t img = task / nchunks, c0 = (task % nchunks) * chunk, len = std::min(chunk, C - c0);
      if (len <= 0) continue;
      const int64_t nk = plan.start[img + 1] - plan.start[img];
      gacc.resize(nk * P * len);
      for (int64_t n = plan.start[img]; n < plan.start[img + 1]; ++n) {  // grad slice, channels innermost
        const int64_t k = plan.order[n], slot = n - plan.start[img];
        for (int64_t c = 0; c < len; ++c)
          for (int64_t q = 0; q < P; ++q) gacc[(slot * P + q) * len + c] = static_cast<A>(grad[(k * C + c0 + c) * P + q]);
      }
      A* base = grad_buf + pb.img_off[img] + c0 * lay.sC;
      const std::vector<RowJob<A>>& jobs = bp.jobs[img];
      const std::vector<int64_t>& st = bp.band_start[img];
      for (int64_t b = 0; b < bp.nbands; ++b) {
        const int64_t r0 = b * bp.band_rows, r1 = std::min(ps.H, r0 + bp.band_rows);
        if (st[b] == st[b + 1]) {
          for (int64_t c = 0; c < len; ++c)
            for (int64_t r = r0; r < r1; ++r) std::fill_n(base + c * lay.sC + r * lay.sH, W, A(0));
          continue;
        }
        std::fill(band.begin(), band.begin() + (r1 - r0) * W * len, A(0));
        for (int64_t u = st[b]; u < st[b + 1]; ++u) {
          const RowJob<A>& job = jobs[u];
          const RoiTaps<A>& t = plan.taps[job.k];
          A* brow = band.data() + (job.row - r0) * W * len;
          const A* gk = gacc.data() + (job.slot * P + job.i * ps.pw) * len;
          for (int64_t j = 0; j < ps.pw; ++j)
            for (int64_t bx = t.x.start[j]; bx < t.x.start[j + 1]; ++bx)
              axpy(job.wy * t.x.w[bx], gk + j * len, brow + t.x.idx[bx] * len, len);
        }
        for (int64_t r = r0; r < r1; ++r) {  // transpose back into the planar gradient
          const A* src = band.data() + (r - r0) * W * len;
          for (int64_t c = 0; c < len; ++c) {
            A* dst = base + c * lay.sC + r * lay.sH;
            for (int64_t x = 0; x < W; ++x) dst[x] = src[x * len + c];
          }
        }
      }
    }
  });
}


// Planar maps, few taps per pixel: each output cell as a dense weight patch over the window its
// taps span, summed against four channel planes at a time in whole vectors along the rows
// (patch_dots4). Task = (image, channel range), channel groups outermost so that the planes stay
// in cache while all the image's RoIs read them. Returns false (nothing done) when the patches
// hold more vector steps than the scalar gather loop has taps (big sparse cells).
template <typename S, typename A>
bool roi_pool_forward_patches(const S* feat, const FeatLayout& lay, const RoiProblem<A>& pb, RoiPlan<A>& plan, S* out) {
  const PoolShape& ps = pb.ps;
  const int64_t C = ps.C, P = ps.ph * ps.pw, K = pb.K;
  double steps = 0;  // vector steps per channel: the patches' size / 8, from the tap spans
  for (int64_t k = 0; k < K; ++k) {
    if (pb.roi_img[k] < 0) continue;
    const RoiTaps<A>& t = plan.taps[k];
    double rows = 0, cols = 0;
    for (int64_t i = 0; i < ps.ph; ++i)
      if (t.y.start[i + 1] > t.y.start[i]) rows += t.y.idx[t.y.start[i + 1] - 1] - t.y.idx[t.y.start[i]] + 1;
    for (int64_t j = 0; j < ps.pw; ++j)
      if (t.x.start[j + 1] > t.x.start[j]) cols += (t.x.idx[t.x.start[j + 1] - 1] - t.x.idx[t.x.start[j]] + 8) / 8;
    steps += rows * cols;
  }
  if (steps > pb.taps) return false;
  parallel_tasks(K, 4.0 * pb.taps, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k)
      if (pb.roi_img[k] >= 0) plan.taps[k].build_patches(ps.ph, ps.pw, ps.W);
  });
  const int64_t nchunks = channel_chunks(pb.images, C, 4);
  const int64_t chunk = (C + nchunks - 1) / nchunks;
  parallel_tasks(pb.images * nchunks, steps * 8.0 * C, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t img = task / nchunks, c0 = (task % nchunks) * chunk, c1 = std::min(C, c0 + chunk);
      const S* base = feat + pb.img_off[img];
      for (int64_t c = c0; c < c1; c += 4) {
        const int64_t nc = std::min<int64_t>(4, c1 - c);
        const S* planes[4];
        for (int64_t j = 0; j < 4; ++j) planes[j] = base + (c + std::min(j, nc - 1)) * lay.sC;
        for (int64_t n = plan.start[img]; n < plan.start[img + 1]; ++n) {
          const int64_t k = plan.order[n];
          const RoiTaps<A>& t = plan.taps[k];
          for (int64_t q = 0; q < P; ++q) {
            const cpu::RgWindow& w = t.pwin[q];
            const S* corner[4];
            for (int j = 0; j < 4; ++j) corner[j] = planes[j] + w.y0 * lay.sH + w.x0;
            A d[4];
            patch_dots4(t.patch.data() + t.pstart[q], w.x1 - w.x0, corner, lay.sH, w.y1 - w.y0, w.x1 - w.x0, d);
            for (int64_t j = 0; j < nc; ++j)
              out[(k * C + c + j) * P + q] = static_cast<S>(d[j] + (pb.enc ? pb.enc[img * C + c + j] : A(0)));
          }
        }
      }
    }
  });
  return true;
}

// out [K, C, ph, pw] (contiguous). lay: how the features are laid out (in place).
// Channels-last maps: task = (RoI, channel range); every tap is a vector over the channel range.
// Planar maps: the banded loops above when the RoIs have enough taps per pixel, else a scalar
// gather per tap with task = (image, channel range), channel outermost so that one channel plane
// stays in cache while all the image's RoIs read it.
template <typename S, typename A>
void roi_pool_forward(const S* feat, const FeatLayout& lay, const RoiProblem<A>& pb, S* out) {
  const PoolShape& ps = pb.ps;
  const int64_t C = ps.C, P = ps.ph * ps.pw, K = pb.K;
  if (K == 0 || C == 0) return;
  RoiPlan<A> plan(pb);
  for (int64_t k = 0; k < K; ++k)  // skipped RoIs (not valid): zero tokens
    if (pb.roi_img[k] < 0) std::fill(out + k * C * P, out + (k + 1) * C * P, static_cast<S>(0));
  if (lay.channels_last) {
    const int64_t nchunks = channel_chunks(K, C);
    const int64_t chunk = (C + nchunks - 1) / nchunks;
    parallel_tasks(K * nchunks, pb.taps * C, [&](int64_t begin, int64_t end) {
      std::vector<A> acc(chunk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t k = task / nchunks, c0 = (task % nchunks) * chunk, len = std::min(chunk, C - c0);
        const int64_t img = pb.roi_img[k];
        if (len <= 0 || img < 0) continue;
        const RoiTaps<A>& t = plan.taps[k];
        const S* base = feat + pb.img_off[img];
        const A* e = pb.enc ? pb.enc + img * C + c0 : nullptr;
        S* o = out + k * C * P;
        for (int64_t i = 0; i < ps.ph; ++i) {
          for (int64_t j = 0; j < ps.pw; ++j) {
            std::fill(acc.begin(), acc.begin() + len, A(0));
            cell_taps(base + c0, t.y.idx.data() + t.y.start[i], lay.sH, t.y.w.data() + t.y.start[i], t.inv_count,
                      t.y.start[i + 1] - t.y.start[i], t.x.idx.data() + t.x.start[j], lay.sW,
                      t.x.w.data() + t.x.start[j], t.x.start[j + 1] - t.x.start[j], len, acc.data());
            if (P == 1) {
              store(acc.data(), e, o + c0, len);
            } else {
              for (int64_t c = 0; c < len; ++c) o[(c0 + c) * P + i * ps.pw + j] = static_cast<S>(acc[c] + (e ? e[c] : A(0)));
            }
          }
        }
      }
    });
    return;
  }
  const BandPlan<A> bp(pb, plan);
  if (prefer_banded(pb, bp, kBandedTapsPerPixelForward)) return roi_pool_forward_banded<S, A>(feat, lay, pb, plan, bp, out);
  if (roi_pool_forward_patches<S, A>(feat, lay, pb, plan, out)) return;
  plan.flatten(pb, lay.sH);
  const int64_t nchunks = channel_chunks(pb.images, C, 1);
  const int64_t chunk = (C + nchunks - 1) / nchunks;
  parallel_tasks(pb.images * nchunks, pb.taps * C, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t img = task / nchunks, c0 = (task % nchunks) * chunk, c1 = std::min(C, c0 + chunk);
      const S* base = feat + pb.img_off[img];
      for (int64_t c = c0; c < c1; ++c) {
        const S* plane = base + c * lay.sC;
        const A ec = pb.enc ? pb.enc[img * C + c] : A(0);
        for (int64_t n = plan.start[img]; n < plan.start[img + 1]; ++n) {
          const int64_t k = plan.order[n];
          const RoiTaps<A>& t = plan.taps[k];
          S* o = out + (k * C + c) * P;
          for (int64_t q = 0; q < P; ++q)
            o[q] = static_cast<S>(gather_dot(plane, t.off.data() + t.cell[q], t.w2.data() + t.cell[q],
                                             t.cell[q + 1] - t.cell[q]) + ec);
        }
      }
    }
  });
}

// grad_buf (accumulation dtype, uninitialised, [images, C, H, W] contiguous or channels-last) =
// the adjoint of roi_pool_forward applied to grad [K, C, ph, pw]. Task = (image, channel range):
// it zeroes and owns that slice of grad_buf (pages are first touched by the thread that fills
// them) and adds its image's RoIs in RoI order, so the result does not depend on the thread count.
template <typename S, typename A>
void roi_pool_backward(const S* grad, const FeatLayout& lay, const RoiProblem<A>& pb, A* grad_buf) {
  const PoolShape& ps = pb.ps;
  const int64_t C = ps.C, P = ps.ph * ps.pw, images = pb.images, HW = ps.H * ps.W;
  if (C == 0 || images == 0 || HW == 0) return;
  RoiPlan<A> plan(pb);
  if (!lay.channels_last) {
    const BandPlan<A> bp(pb, plan);
    if (prefer_banded(pb, bp, kBandedTapsPerPixelBackward))
      return roi_pool_backward_banded<S, A>(grad, lay, pb, plan, bp, grad_buf);
    plan.flatten(pb, lay.sH);
  }
  const int64_t nchunks = channel_chunks(images, C, lay.channels_last ? 16 : 1);
  const int64_t chunk = (C + nchunks - 1) / nchunks;
  parallel_tasks(images * nchunks, (pb.taps + images * HW) * C, [&](int64_t begin, int64_t end) {
    std::vector<A> gv(chunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t img = task / nchunks, c0 = (task % nchunks) * chunk, len = std::min(chunk, C - c0);
      if (len <= 0) continue;
      A* base = grad_buf + pb.img_off[img];
      if (lay.channels_last) {
        for (int64_t p = 0; p < HW; ++p) std::fill_n(base + p * C + c0, len, A(0));
      } else {
        std::fill_n(base + c0 * HW, len * HW, A(0));
      }
      if (lay.channels_last) {
        for (int64_t n = plan.start[img]; n < plan.start[img + 1]; ++n) {
          const int64_t k = plan.order[n];
          const RoiTaps<A>& t = plan.taps[k];
          const S* g = grad + k * C * P;
          for (int64_t i = 0; i < ps.ph; ++i) {
            for (int64_t j = 0; j < ps.pw; ++j) {
              const int64_t q = i * ps.pw + j;
              for (int64_t c = 0; c < len; ++c) gv[c] = static_cast<A>(g[(c0 + c) * P + q]) * t.inv_count;
              for (int64_t a = t.y.start[i]; a < t.y.start[i + 1]; ++a) {
                A* row = base + t.y.idx[a] * lay.sH + c0;
                for (int64_t b = t.x.start[j]; b < t.x.start[j + 1]; ++b)
                  axpy(t.y.w[a] * t.x.w[b], gv.data(), row + t.x.idx[b] * lay.sW, len);
              }
            }
          }
        }
        continue;
      }
      for (int64_t c = c0; c < c0 + len; ++c) {
        A* plane = base + c * lay.sC;
        for (int64_t n = plan.start[img]; n < plan.start[img + 1]; ++n) {
          const int64_t k = plan.order[n];
          const RoiTaps<A>& t = plan.taps[k];
          const S* g = grad + (k * C + c) * P;
          for (int64_t q = 0; q < P; ++q) {
            const A gq = static_cast<A>(g[q]);
            for (int64_t u = t.cell[q]; u < t.cell[q + 1]; ++u) plane[t.off[u]] += gq * t.w2[u];
          }
        }
      }
    }
  });
}

// ---- host helpers -------------------------------------------------------------------------------
// Per-image element offsets of a tensor whose leading dims (all but the last three) index images.
std::vector<int64_t> image_offsets(const at::Tensor& t) {
  const int64_t lead = t.dim() - 3;
  int64_t images = 1;
  for (int64_t d = 0; d < lead; ++d) images *= t.size(d);
  std::vector<int64_t> off(images);
  for (int64_t i = 0; i < images; ++i) {
    int64_t rem = i, o = 0;
    for (int64_t d = lead - 1; d >= 0; --d) {
      o += (rem % t.size(d)) * t.stride(d);
      rem /= t.size(d);
    }
    off[i] = o;
  }
  return off;
}

// An empty gradient buffer [..., C, H, W] of `sizes`: contiguous, or channels-last.
// Large buffers get the huge-page advice before their first touch (cpu/alloc.h).
at::Tensor new_grad_buffer(at::IntArrayRef sizes, const at::TensorOptions& opt, bool channels_last, bool zero = true) {
  if (!channels_last) {
    at::Tensor t = empty_output(sizes, opt);
    return zero ? t.zero_() : t;
  }
  const int64_t d = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> cl(sizes.begin(), sizes.end() - 3);
  cl.push_back(sizes[d - 2]);
  cl.push_back(sizes[d - 1]);
  cl.push_back(sizes[d - 3]);
  std::vector<int64_t> back;
  for (int64_t i = 0; i < d - 3; ++i) back.push_back(i);
  back.push_back(d - 1);
  back.push_back(d - 3);
  back.push_back(d - 2);
  at::Tensor t = empty_output(cl, opt);
  return (zero ? t.zero_() : t).permute(back);
}

// Features as the kernels read them: in place when possible, else a contiguous copy.
std::pair<at::Tensor, FeatLayout> readable_features(const at::Tensor& f) {
  auto lay = feature_layout(f);
  if (lay) return {f, *lay};
  at::Tensor g = f.contiguous();
  return {g, *feature_layout(g)};
}

// Frame encodings [B*T, C] in the accumulation dtype (the fused TPE), or an undefined tensor.
at::Tensor frame_encodings(const c10::optional<at::Tensor>& timestamps, const c10::optional<at::Tensor>& table,
                           int64_t C, double base, at::ScalarType acc_dt, const char* op) {
  if (!(timestamps.has_value() && timestamps->defined())) return at::Tensor();
  const int64_t BT = timestamps->numel();
  at::Tensor enc = at::empty({BT, C}, timestamps->options().dtype(acc_dt));
  if (table.has_value() && table->defined()) {
    // Learned table: check the rows and copy them in one host loop (a handful of rows: the
    // aminmax / item / index_select ops of prepare_encoder cost more than the whole copy).
    const at::Tensor tab = table->to(acc_dt).contiguous();
    const at::Tensor rows = timestamps->to(at::kLong).contiguous();
    const int64_t L = tab.size(0);
    const int64_t* rp = rows.data_ptr<int64_t>();
    if (BT > 0) {
      const auto [lo, hi] = std::minmax_element(rp, rp + BT);
      TORCH_CHECK(*lo >= 0 && *hi < L, op, ": timestamps must index rows of table in [0, ", L, "), got values in [", *lo,
                  ", ", *hi, "]");
    }
    if (C == 0) return enc;
    AT_DISPATCH_FLOATING_TYPES(acc_dt, "regional_frame_encodings", [&] {
      const scalar_t* tp = tab.data_ptr<scalar_t>();
      scalar_t* e = enc.data_ptr<scalar_t>();
      for (int64_t bt = 0; bt < BT; ++bt) std::copy_n(tp + rp[bt] * C, C, e + bt * C);
    });
    return enc;
  }
  const EncoderInputs in = prepare_encoder(*timestamps, table, acc_dt, op, /*check_range=*/true);
  if (BT == 0 || C == 0) return enc;
  AT_DISPATCH_FLOATING_TYPES(acc_dt, "regional_frame_encodings", [&] {
    using A = scalar_t;
    const A* sec = in.seconds.data_ptr<A>();
    A* e = enc.data_ptr<A>();
    const A log_base = static_cast<A>(std::log(base));
    parallel_tasks(BT, 20.0 * BT * C, [&](int64_t b0, int64_t b1) {
      for (int64_t bt = b0; bt < b1; ++bt)
        for (int64_t c = 0; c < C; ++c) e[bt * C + c] = tpe_value<A>(sec[bt], c, C, log_base);
    });
  });
  return enc;
}

// ---- roi_align ----------------------------------------------------------------------------------
struct RoiInputs {
  at::Tensor boxes;  // [K, 4] acc dtype
  std::vector<int64_t> roi_img;
};

RoiInputs roi_inputs_from_rois(const at::Tensor& rois, int64_t N, at::ScalarType acc) {
  RoiInputs r;
  const at::Tensor rc = rois.to(acc).contiguous();
  const int64_t K = rc.size(0);
  r.boxes = rc.narrow(1, 1, 4).contiguous();
  r.roi_img.resize(K);
  AT_DISPATCH_FLOATING_TYPES(acc, "roi_inputs", [&] {
    const scalar_t* p = rc.data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t v = p[k * 5];
      // Truncation toward zero, as torchvision casts the index; range checked before any read.
      TORCH_CHECK(static_cast<double>(v) > -1.0 && static_cast<double>(v) < static_cast<double>(N),
                  "roi_align: rois[", k, ", 0] (batch index) must be in [0, ", N, "), got ", static_cast<double>(v));
      r.roi_img[k] = static_cast<int64_t>(v);
    }
  });
  return r;
}

template <typename A>
double total_taps(const RoiProblem<A>& pb) {
  double taps = 0;
  for (int64_t k = 0; k < pb.K; ++k)
    if (pb.roi_img[k] >= 0) taps += estimate_taps<A>(pb.boxes + 4 * k, pb.ps);
  return taps;
}

template <typename A>
RoiProblem<A> make_problem(const PoolShape& ps, int64_t K, int64_t images, const at::Tensor& boxes,
                           const std::vector<int64_t>& roi_img, const std::vector<int64_t>& img_off, const A* enc) {
  RoiProblem<A> pb;
  pb.ps = ps;
  pb.K = K;
  pb.images = images;
  pb.boxes = K > 0 ? boxes.data_ptr<A>() : nullptr;
  pb.roi_img = roi_img.data();
  pb.img_off = img_off.data();
  pb.enc = enc;
  pb.taps = total_taps(pb);
  return pb;
}

at::Tensor roi_align_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t ph, int64_t pw,
                         int64_t sampling_ratio, bool aligned) {
  check_roi_align(input, rois, ph, pw, sampling_ratio);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), K = rois.size(0);
  at::Tensor out = empty_output({K, C, ph, pw}, input.options());
  if (K == 0 || C == 0) return out;
  const at::ScalarType acc = acc_type(input.scalar_type());
  RoiInputs ri = roi_inputs_from_rois(rois, N, acc);
  const PoolShape ps{C, H, W, ph, pw, sampling_ratio, aligned, spatial_scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "roi_align_cpu", [&] {
    using A = acc_t<scalar_t>;
    std::vector<int64_t> no_off(N, 0);
    RoiProblem<A> pb = make_problem<A>(ps, K, N, ri.boxes, ri.roi_img, no_off, nullptr);
    auto [f, lay] = readable_features(input);
    const std::vector<int64_t> off = image_offsets(f);
    pb.img_off = off.data();
    roi_pool_forward<scalar_t, A>(f.data_ptr<scalar_t>(), lay, pb, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale, int64_t ph,
                                  int64_t pw, int64_t sampling_ratio, bool aligned, int64_t N, int64_t H, int64_t W,
                                  bool channels_last, bool deterministic) {
  (void)deterministic;  // the CPU kernel is always deterministic
  TORCH_CHECK(grad.dim() == 4 && grad.size(2) == ph && grad.size(3) == pw, "roi_align_backward: grad must be [K, C, ",
              ph, ", ", pw, "], got ", grad.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5 && rois.size(0) == grad.size(0),
              "roi_align_backward: rois must be [K, 5] with K = ", grad.size(0), ", got ", rois.sizes());
  TORCH_CHECK(N >= 0 && H >= 0 && W >= 0, "roi_align_backward: bad input size");
  const int64_t C = grad.size(1), K = grad.size(0);
  const at::ScalarType acc = acc_type(grad.scalar_type());
  at::Tensor buf = new_grad_buffer({N, C, H, W}, grad.options().dtype(acc), channels_last, /*zero=*/false);
  if (C > 0 && N * H * W > 0) {
    RoiInputs ri = roi_inputs_from_rois(rois, N, acc);
    const PoolShape ps{C, H, W, ph, pw, sampling_ratio, aligned, spatial_scale};
    const at::Tensor g = grad.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "roi_align_backward_cpu", [&] {
      using A = acc_t<scalar_t>;
      std::vector<int64_t> no_off(N, 0);
      RoiProblem<A> pb = make_problem<A>(ps, K, N, ri.boxes, ri.roi_img, no_off, nullptr);
      const std::vector<int64_t> off = image_offsets(buf);
      pb.img_off = off.data();
      roi_pool_backward<scalar_t, A>(g.data_ptr<scalar_t>(), *feature_layout(buf), pb, buf.data_ptr<A>());
    });
  }
  return buf.scalar_type() == grad.scalar_type() ? buf : buf.to(grad.scalar_type());
}

// ---- region_pool --------------------------------------------------------------------------------
struct RegionInputs {
  at::Tensor boxes;  // [K, 4] acc
  std::vector<int64_t> roi_img;  // frame b*T + t, or -1 when not valid
};

RegionInputs region_inputs(const at::Tensor& boxes, const c10::optional<at::Tensor>& valid, at::ScalarType acc) {
  RegionInputs r;
  const int64_t B = boxes.size(0), T = boxes.size(1), R = boxes.size(2), K = B * T * R;
  r.boxes = boxes.to(acc).reshape({K, 4}).contiguous();
  r.roi_img.resize(K);
  const bool has_valid = valid.has_value() && valid->defined();
  const at::Tensor v = has_valid ? valid->reshape({K}).contiguous() : at::Tensor();
  const bool* vp = has_valid ? v.data_ptr<bool>() : nullptr;
  for (int64_t k = 0; k < K; ++k) r.roi_img[k] = (vp && !vp[k]) ? -1 : k / std::max<int64_t>(R, 1);
  return r;
}

at::Tensor region_pool_cpu(const at::Tensor& features, const at::Tensor& boxes, const c10::optional<at::Tensor>& valid,
                           const c10::optional<at::Tensor>& timestamps, const c10::optional<at::Tensor>& table,
                           double spatial_scale, int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned,
                           double base) {
  check_region_pool(features, boxes, valid, timestamps, table, ph, pw, sampling_ratio);
  const int64_t B = features.size(0), T = features.size(1), C = features.size(2), H = features.size(3),
                W = features.size(4), R = boxes.size(2), K = B * T * R;
  at::Tensor out = empty_output({B, T, R, C, ph, pw}, features.options());
  if (K == 0 || C == 0) return out;
  const at::ScalarType acc = acc_type(features.scalar_type());
  RegionInputs ri = region_inputs(boxes, valid, acc);
  const at::Tensor enc = frame_encodings(timestamps, table, C, base, acc, "region_pool");
  const PoolShape ps{C, H, W, ph, pw, sampling_ratio, aligned, spatial_scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "region_pool_cpu", [&] {
    using A = acc_t<scalar_t>;
    std::vector<int64_t> no_off(B * T, 0);
    RoiProblem<A> pb = make_problem<A>(ps, K, B * T, ri.boxes, ri.roi_img, no_off,
                                       enc.defined() ? enc.data_ptr<A>() : nullptr);
    auto [f, lay] = readable_features(features);
    const std::vector<int64_t> off = image_offsets(f);
    pb.img_off = off.data();
    roi_pool_forward<scalar_t, A>(f.data_ptr<scalar_t>(), lay, pb, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor region_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& boxes,
                                    const c10::optional<at::Tensor>& valid, double spatial_scale, int64_t ph,
                                    int64_t pw, int64_t sampling_ratio, bool aligned, int64_t H, int64_t W,
                                    bool channels_last, bool deterministic) {
  (void)deterministic;
  TORCH_CHECK(grad.dim() == 6 && grad.size(4) == ph && grad.size(5) == pw,
              "region_pool_backward: grad must be [B, T, R, C, ph, pw], got ", grad.sizes());
  TORCH_CHECK(boxes.dim() == 4 && boxes.size(0) == grad.size(0) && boxes.size(1) == grad.size(1) &&
                  boxes.size(2) == grad.size(2) && boxes.size(3) == 4,
              "region_pool_backward: boxes must be [B, T, R, 4] matching grad, got ", boxes.sizes());
  if (valid.has_value() && valid->defined())
    TORCH_CHECK(valid->sizes() == boxes.sizes().slice(0, 3) && valid->scalar_type() == at::kBool,
                "region_pool_backward: valid must be a bool [B, T, R]");
  const int64_t B = grad.size(0), T = grad.size(1), R = grad.size(2), C = grad.size(3), K = B * T * R;
  const at::ScalarType acc = acc_type(grad.scalar_type());
  at::Tensor buf = new_grad_buffer({B, T, C, H, W}, grad.options().dtype(acc), channels_last, /*zero=*/false);
  if (C > 0 && B * T * H * W > 0) {
    RegionInputs ri = region_inputs(boxes, valid, acc);
    const PoolShape ps{C, H, W, ph, pw, sampling_ratio, aligned, spatial_scale};
    const at::Tensor g = grad.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "region_pool_backward_cpu", [&] {
      using A = acc_t<scalar_t>;
      std::vector<int64_t> no_off(B * T, 0);
      RoiProblem<A> pb = make_problem<A>(ps, K, B * T, ri.boxes, ri.roi_img, no_off, nullptr);
      const std::vector<int64_t> off = image_offsets(buf);
      pb.img_off = off.data();
      roi_pool_backward<scalar_t, A>(g.data_ptr<scalar_t>(), *feature_layout(buf), pb, buf.data_ptr<A>());
    });
  }
  return buf.scalar_type() == grad.scalar_type() ? buf : buf.to(grad.scalar_type());
}

// ---- mask_pool ----------------------------------------------------------------------------------
// Resize taps of one axis (the same for every mask: they depend on the sizes only).
template <typename A>
std::vector<ResizeTap<A>> resize_taps(int64_t n_in, int64_t n_out) {
  std::vector<ResizeTap<A>> t(n_out);
  for (int64_t o = 0; o < n_out; ++o) t[o] = resize_axis_tap<A>(o, n_in, n_out);
  return t;
}

using cpu::RgWindow;

// One resized row (generic, float).
template <typename A>
void resize_row(const A* r0, const A* r1, A wy0, A wy1, const int64_t* lo, const int64_t* hi, const A* wlo,
                const A* whi, int64_t W, A* d) {
  for (int64_t x = 0; x < W; ++x)
    d[x] = wy0 * (wlo[x] * r0[lo[x]] + whi[x] * r0[hi[x]]) + wy1 * (wlo[x] * r1[lo[x]] + whi[x] * r1[hi[x]]);
}
void resize_row(const float* r0, const float* r1, float wy0, float wy1, const int64_t* lo, const int64_t* hi,
                const float* wlo, const float* whi, int64_t W, float* d) {
  cpu::rg_resize_row_f32(r0, r1, wy0, wy1, lo, hi, wlo, whi, W, d);
}

// The masks resized to the feature grid, once per call: a small buffer ([BT*R, H*W], about R
// times a channel plane per frame) that every channel then reads from cache.
struct ResizedMasks {
  at::Tensor mt;                // [BT * R, H * W] resized masks (accumulation dtype)
  at::Tensor inv_z;             // [BT * R] 1 / (sum + eps)
  std::vector<RgWindow> win;    // per mask: the rectangle that holds its non-zeros (empty: all zero),
                                // widened to whole vectors (rg_vector_window)
  double window_work = 0;       // sum of window rows x columns rounded up to 8 (multiply-adds per channel)
};

template <typename A>
ResizedMasks resize_masks(const at::Tensor& masks_in, int64_t H, int64_t W, double eps) {
  const at::Tensor masks = masks_in.to(c10::CppTypeToScalarType<A>::value);
  const int64_t B = masks.size(0), T = masks.size(1), R = masks.size(2), Hm = masks.size(3), Wm = masks.size(4);
  const int64_t n = B * T * R, HW = H * W;
  ResizedMasks rm;
  rm.mt = at::empty({n, HW}, masks.options());
  rm.inv_z = at::empty({n}, masks.options());
  rm.win.assign(n, RgWindow{0, 0, 0, 0});
  if (n == 0) return rm;
  const auto ty = resize_taps<A>(Hm, H);
  // x taps as flat arrays of element offsets and weights (the inner loop has no struct loads)
  const int64_t s0 = masks.stride(0), s1 = masks.stride(1), s2 = masks.stride(2), sy = masks.stride(3),
                sx = masks.stride(4);
  std::vector<int64_t> xlo(W), xhi(W);
  std::vector<A> wlo(W), whi(W);
  for (int64_t x = 0; x < W; ++x) {
    const ResizeTap<A> t = resize_axis_tap<A>(x, Wm, W);
    xlo[x] = t.lo * sx;
    xhi[x] = t.hi * sx;
    wlo[x] = t.w_lo;
    whi[x] = t.w_hi;
  }
  const A* mp = masks.data_ptr<A>();
  A* mt = rm.mt.data_ptr<A>();
  A* inv_z = rm.inv_z.data_ptr<A>();
  parallel_tasks(n, 8.0 * n * HW, [&](int64_t b0, int64_t b1) {
    for (int64_t m = b0; m < b1; ++m) {
      const int64_t r = m % R, t = (m / R) % T, b = m / (R * T);
      const A* src = mp + b * s0 + t * s1 + r * s2;
      A* dst = mt + m * HW;
      int64_t y0 = H, y1 = 0, x0 = W, x1 = 0;
      for (int64_t y = 0; y < H; ++y) {
        const ResizeTap<A>& a = ty[y];
        const A* r0 = src + a.lo * sy;
        const A* r1 = src + a.hi * sy;
        if (sx == 1 && y + 2 < H) {
          // Downsampling reads two rows here, then jumps rows: too short a stream for the hardware
          // prefetcher, so the loads would wait on memory one row at a time. Fetch two rows ahead.
          const ResizeTap<A>& a2 = ty[y + 2];
          for (int64_t q = xlo[0]; q <= xhi[W - 1]; q += 64 / static_cast<int64_t>(sizeof(A))) {
            __builtin_prefetch(src + a2.lo * sy + q);
            __builtin_prefetch(src + a2.hi * sy + q);
          }
        }
        A* d = dst + y * W;
        resize_row(r0, r1, a.w_lo, a.w_hi, xlo.data(), xhi.data(), wlo.data(), whi.data(), W, d);
        int64_t first = 0, last = W;
        while (first < W && d[first] == A(0)) ++first;
        if (first == W) continue;  // an all-zero row
        while (d[last - 1] == A(0)) --last;
        y0 = std::min(y0, y);
        y1 = y + 1;
        x0 = std::min(x0, first);
        x1 = std::max(x1, last);
      }
      // sum in eight fixed partial sums (vectorisable, independent of the thread count)
      A p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t q = 0;
      for (; q + 8 <= HW; q += 8)
        for (int k = 0; k < 8; ++k) p[k] += dst[q + k];
      A sum = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
      for (; q < HW; ++q) sum += dst[q];
      inv_z[m] = A(1) / (sum + static_cast<A>(eps));
      if (y1 > y0) rm.win[m] = cpu::rg_vector_window(RgWindow{y0, y1, x0, x1}, W);
    }
  });
  for (const RgWindow& w : rm.win)
    rm.window_work += static_cast<double>(w.y1 - w.y0) * static_cast<double>((w.x1 - w.x0 + 7) / 8 * 8);
  return rm;
}

// The masks the forward resized (its second and third outputs, saved for the backward): the
// windows are found again by a scan of the resized values (a few KB per frame), not by resizing.
ResizedMasks saved_masks(const at::Tensor& resized, const at::Tensor& inv_z, int64_t H, int64_t W) {
  ResizedMasks rm;
  const int64_t n = inv_z.numel(), HW = H * W;
  rm.mt = resized.contiguous().view({n, HW});
  rm.inv_z = inv_z.contiguous().view({n});
  rm.win.assign(n, RgWindow{0, 0, 0, 0});
  AT_DISPATCH_FLOATING_TYPES(rm.mt.scalar_type(), "mask_pool_windows", [&] {
    const scalar_t* mt = rm.mt.data_ptr<scalar_t>();
    parallel_tasks(n, 2.0 * n * HW, [&](int64_t b0, int64_t b1) {
      for (int64_t m = b0; m < b1; ++m) {
        const scalar_t* d = mt + m * HW;
        int64_t y0 = H, y1 = 0, x0 = W, x1 = 0;
        for (int64_t y = 0; y < H; ++y) {
          const scalar_t* row = d + y * W;
          int64_t first = 0, last = W;
          while (first < W && row[first] == scalar_t(0)) ++first;
          if (first == W) continue;
          while (row[last - 1] == scalar_t(0)) --last;
          y0 = std::min(y0, y);
          y1 = y + 1;
          x0 = std::min(x0, first);
          x1 = std::max(x1, last);
        }
        if (y1 > y0) rm.win[m] = cpu::rg_vector_window(RgWindow{y0, y1, x0, x1}, W);
      }
    });
  });
  for (const RgWindow& w : rm.win)
    rm.window_work += static_cast<double>(w.y1 - w.y0) * static_cast<double>((w.x1 - w.x0 + 7) / 8 * 8);
  return rm;
}

// Features [B, T, C, H, W] as one matrix per frame without a copy: [BT, C, HW] for planar maps or
// [BT, HW, C] for channels-last ones, when the frame dims and the pixel dims each merge into one
// stride. Undefined otherwise. Mask pooling is then a batched GEMM per frame (at::bmm / BLAS):
// out[R, C] = mt[R, HW] @ f[HW, C], which reads the map at the memory's pace.
at::Tensor frames_matrix(const at::Tensor& f, bool* channels_last) {
  const int64_t B = f.size(0), T = f.size(1), C = f.size(2), H = f.size(3), W = f.size(4);
  int64_t sF;
  if (T == 1) {
    sF = f.stride(0);
  } else if (B == 1 || f.stride(0) == T * f.stride(1)) {
    sF = f.stride(1);
  } else {
    return at::Tensor();
  }
  if (f.stride(4) == 1 && (H == 1 || f.stride(3) == W)) {
    *channels_last = false;
    return f.as_strided({B * T, C, H * W}, {sF, f.stride(2), 1});
  }
  if (f.stride(2) == 1 && (H == 1 || f.stride(3) == W * f.stride(4))) {
    *channels_last = true;
    return f.as_strided({B * T, H * W, C}, {sF, f.stride(4), 1});
  }
  return at::Tensor();
}

// The windowed loops below do about window_work multiply-adds per channel where the GEMM does
// R * H * W (every mask over every pixel), but BLAS runs each multiply-add several times faster.
// Windows below this fraction of the full grid go to the windowed loops (benchmarks/bench_regional.py,
// box masks and dense random masks).
constexpr double kWindowedFraction = 0.35;

bool prefer_windowed(const ResizedMasks& rm, int64_t HW) {
  return rm.window_work < kWindowedFraction * static_cast<double>(rm.win.size()) * static_cast<double>(HW);
}

// out[r, c] = sum over mask r's window of m[r, p] * f[c, p] for one frame and a channel range
// [c0, c0 + len): acc[r * stride + c - c0]. Planar maps: four channel planes at a time, all the
// frame's masks per plane group (the planes stay in cache); channels-last maps: every non-zero
// pixel of a window is a vector over the channel range.
template <typename S, typename A>
void windowed_pool_frame(const S* base, const FeatLayout& lay, int64_t W, const A* m, const RgWindow* win, int64_t R,
                         int64_t HW, int64_t c0, int64_t len, A* acc, int64_t stride) {
  if (lay.channels_last) {
    for (int64_t r = 0; r < R; ++r) {
      A* a = acc + r * stride;
      std::fill(a, a + len, A(0));
      const RgWindow& w = win[r];
      for (int64_t y = w.y0; y < w.y1; ++y)
        for (int64_t x = w.x0; x < w.x1; ++x) {
          const A wgt = m[r * HW + y * W + x];
          if (wgt != A(0)) axpy(wgt, base + y * lay.sH + x * lay.sW + c0, a, len);
        }
    }
    return;
  }
  // The rows any window reads; prefetched for the next plane group while this one is summed (the
  // window rows of a plane are short runs the hardware prefetcher does not follow).
  int64_t ys = std::numeric_limits<int64_t>::max(), ye = 0;
  for (int64_t r = 0; r < R; ++r)
    if (win[r].y1 > win[r].y0) ys = std::min(ys, win[r].y0), ye = std::max(ye, win[r].y1);
  const int64_t line = 64 / static_cast<int64_t>(sizeof(S));
  for (int64_t c = 0; c < len; c += 4) {
    const S* planes[4];
    for (int j = 0; j < 4; ++j) planes[j] = base + (c0 + std::min<int64_t>(c + j, len - 1)) * lay.sC;
    for (int64_t j = c + 4; j < std::min(c + 8, len); ++j)
      for (int64_t y = ys; y < ye; ++y)
        for (int64_t x = 0; x < W; x += line) __builtin_prefetch(base + (c0 + j) * lay.sC + y * lay.sH + x);
    for (int64_t r = 0; r < R; ++r) {
      A d[4];
      const RgWindow& w = win[r];
      const S* corner[4];
      for (int j = 0; j < 4; ++j) corner[j] = planes[j] + w.y0 * lay.sH + w.x0;
      patch_dots4(m + r * HW + w.y0 * W + w.x0, W, corner, lay.sH, w.y1 - w.y0, w.x1 - w.x0, d);
      for (int64_t j = 0; j < std::min<int64_t>(4, len - c); ++j) acc[r * stride + c + j] = d[j];
    }
  }
}

// Returns (out [B, T, R, C], the resized masks [B, T, R, H, W] and 1 / (sum + eps) [B, T, R] in the
// accumulation dtype): the backward takes the last two instead of resizing the masks again.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_pool_cpu(const at::Tensor& features, const at::Tensor& masks,
                                                             const c10::optional<at::Tensor>& timestamps,
                                                             const c10::optional<at::Tensor>& table, double eps,
                                                             double base) {
  check_mask_pool(features, masks, timestamps, table);
  const int64_t B = features.size(0), T = features.size(1), C = features.size(2), H = features.size(3),
                W = features.size(4), R = masks.size(2), BT = B * T, HW = H * W;
  at::Tensor out = at::empty({B, T, R, C}, features.options());
  const at::ScalarType acc = acc_type(features.scalar_type());
  ResizedMasks rm;
  AT_DISPATCH_FLOATING_TYPES(acc, "mask_pool_resize", [&] { rm = resize_masks<scalar_t>(masks, H, W, eps); });
  const std::tuple<at::Tensor, at::Tensor, at::Tensor> result{out, rm.mt.view({B, T, R, H, W}),
                                                              rm.inv_z.view({B, T, R})};
  if (BT * R == 0 || C == 0) return result;
  const at::Tensor enc = frame_encodings(timestamps, table, C, base, acc, "mask_pool");
  bool cl = false;
  const at::Tensor fm = features.scalar_type() == acc ? frames_matrix(features, &cl) : at::Tensor();
  if (fm.defined() && !prefer_windowed(rm, HW)) {  // dense masks, fp32 / fp64: one GEMM per frame
    const at::Tensor m3 = rm.mt.view({BT, R, HW});
    at::Tensor pooled = cl ? at::bmm(m3, fm) : at::bmm(m3, fm.transpose(1, 2));  // [BT, R, C]
    pooled.mul_(rm.inv_z.view({BT, R, 1}));
    if (enc.defined()) pooled.add_(enc.view({BT, 1, C}));
    out.view({BT, R, C}).copy_(pooled);
    return result;
  }
  // Sparse masks, bf16 / fp16 (fp32 accumulation), or strides that do not merge: the windowed loops.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "mask_pool_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto [f, lay] = readable_features(features);
    const std::vector<int64_t> off = image_offsets(f);
    const scalar_t* fp = f.data_ptr<scalar_t>();
    const A* mp = rm.mt.data_ptr<A>();
    const A* zp = rm.inv_z.data_ptr<A>();
    const A* ep = enc.defined() ? enc.data_ptr<A>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t nchunks = channel_chunks(BT, C);
    const int64_t chunk = (C + nchunks - 1) / nchunks;
    parallel_tasks(BT * nchunks, (rm.window_work + BT * R) * C, [&](int64_t begin, int64_t end) {
      std::vector<A> acc_v(R * chunk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bt = task / nchunks, c0 = (task % nchunks) * chunk, len = std::min(chunk, C - c0);
        if (len <= 0) continue;
        windowed_pool_frame<scalar_t, A>(fp + off[bt], lay, W, mp + bt * R * HW, rm.win.data() + bt * R, R, HW, c0, len,
                                         acc_v.data(), chunk);
        for (int64_t r = 0; r < R; ++r) {
          A* v = acc_v.data() + r * chunk;
          const A iz = zp[bt * R + r];
          for (int64_t c = 0; c < len; ++c) v[c] *= iz;
          store(v, ep ? ep + bt * C + c0 : nullptr, op + (bt * R + r) * C + c0, len);
        }
      }
    });
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor> mask_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& features,
                                                          const at::Tensor& masks, const at::Tensor& resized,
                                                          const at::Tensor& inv_z, bool need_features_grad,
                                                          bool need_masks_grad, bool channels_last) {
  check_mask_pool(features, masks, c10::nullopt, c10::nullopt);
  const int64_t B = features.size(0), T = features.size(1), C = features.size(2), H = features.size(3),
                W = features.size(4), R = masks.size(2), BT = B * T, HW = H * W;
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == B && grad.size(1) == T && grad.size(2) == R && grad.size(3) == C,
              "mask_pool_backward: grad must be [B, T, R, C], got ", grad.sizes());
  const at::ScalarType acc = acc_type(features.scalar_type());
  check_saved_masks(resized, inv_z, B, T, R, H, W, acc, "mask_pool_backward");
  check_same_device(features, resized, "resized", "mask_pool_backward");
  at::Tensor gf = need_features_grad ? new_grad_buffer(features.sizes(), features.options(), channels_last, /*zero=*/false)
                                     : at::empty({0}, features.options());
  at::Tensor gm = need_masks_grad ? empty_output(masks.sizes(), masks.options()) : at::empty({0}, masks.options());
  if (!(need_features_grad || need_masks_grad)) return {gf, gm};
  if (BT * R == 0 || C == 0) {
    if (need_features_grad) gf.zero_();
    if (need_masks_grad) gm.zero_();
    return {gf, gm};
  }
  const ResizedMasks rm = saved_masks(resized, inv_z, H, W);
  // gn[bt, r, c] = grad / Z (acc dtype). A plain loop on parallel_tasks, not a torch mul: at the
  // 4D-RGPT size that mul is an OpenMP region, which waits for a descheduled thread at two threads.
  const at::Tensor gn = at::empty({B, T, R, C}, features.options().dtype(acc));
  {
    // read in its own dtype when that accumulates in `acc` (bf16 / fp16 / fp32 -> fp32), else converted
    const at::Tensor gc = (acc_type(grad.scalar_type()) == acc ? grad : grad.to(acc)).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gc.scalar_type(), "mask_pool_grad_scale", [&] {
      using A = acc_t<scalar_t>;
      const scalar_t* src = gc.data_ptr<scalar_t>();
      const A* iz = rm.inv_z.data_ptr<A>();
      A* dst = gn.data_ptr<A>();
      parallel_tasks(BT * R, static_cast<double>(BT * R * C), [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m)
          for (int64_t c = 0; c < C; ++c) dst[m * C + c] = static_cast<A>(src[m * C + c]) * iz[m];
      });
    });
  }
  bool cl = false;
  const at::Tensor fm = features.scalar_type() == acc ? frames_matrix(features, &cl) : at::Tensor();
  const bool windowed = !fm.defined() || prefer_windowed(rm, HW);
  const at::Tensor m3 = rm.mt.view({BT, R, HW}), gn3 = gn.view({BT, R, C});
  if (need_features_grad && !windowed) {  // dense masks, fp32 / fp64: batched GEMMs straight into the gradient
    bool gcl = false;
    at::Tensor g3 = frames_matrix(gf, &gcl);  // a fresh contiguous or channels-last buffer: always merges
    if (gcl) {
      at::bmm_out(g3, m3.transpose(1, 2), gn3);  // [BT, HW, C]
    } else {
      at::bmm_out(g3, gn3.transpose(1, 2), m3);  // [BT, C, HW]
    }
  }
  at::Tensor gfr;  // [BT * R, HW]: GF = sum_c gn[r, c] f[c, p], for the mask gradient
  if (need_masks_grad && fm.defined())
    gfr = (cl ? at::bmm(gn3, fm.transpose(1, 2)) : at::bmm(gn3, fm)).view({BT * R, HW});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "mask_pool_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const A* mp = rm.mt.data_ptr<A>();
    const A* gp = gn.data_ptr<A>();
    if (need_features_grad && windowed) {
      // grad_f[c, p] = sum_r gn[r, c] * mt[r, p]: task = (frame, channel range), each writes its
      // slice; every mask adds over its window only, in mask order.
      const FeatLayout gl = *feature_layout(gf);
      const std::vector<int64_t> goff = image_offsets(gf);
      scalar_t* gfp = gf.data_ptr<scalar_t>();
      const int64_t nchunks = channel_chunks(BT, C);
      const int64_t chunk = (C + nchunks - 1) / nchunks;
      parallel_tasks(BT * nchunks, (rm.window_work + BT * HW) * C, [&](int64_t begin, int64_t end) {
        std::vector<A> v(std::max(HW, chunk));
        for (int64_t task = begin; task < end; ++task) {
          const int64_t bt = task / nchunks, c0 = (task % nchunks) * chunk, len = std::min(chunk, C - c0);
          if (len <= 0) continue;
          const A* m = mp + bt * R * HW;
          const RgWindow* win = rm.win.data() + bt * R;
          const A* g = gp + bt * R * C;
          scalar_t* dst = gfp + goff[bt];
          if (gl.channels_last) {
            for (int64_t p = 0; p < HW; ++p) {
              std::fill(v.begin(), v.begin() + len, A(0));
              for (int64_t r = 0; r < R; ++r) {
                const A wgt = m[r * HW + p];
                if (wgt != A(0)) axpy(wgt, g + r * C + c0, v.data(), len);
              }
              store(v.data(), static_cast<const A*>(nullptr), dst + (p / W) * gl.sH + (p % W) * gl.sW + c0, len);
            }
          } else {
            for (int64_t c = c0; c < c0 + len; ++c) {
              // fp32 / fp64: straight into the gradient plane; else via an fp32 plane
              A* plane = std::is_same_v<scalar_t, A> ? reinterpret_cast<A*>(dst + c * gl.sC) : v.data();
              std::fill(plane, plane + HW, A(0));
              for (int64_t r = 0; r < R; ++r) window_axpy(g[r * C + c], m + r * HW, plane, W, win[r]);
              if (!std::is_same_v<scalar_t, A>) store(v.data(), static_cast<const A*>(nullptr), dst + c * gl.sC, HW);
            }
          }
        }
      });
    }
    if (need_masks_grad) {
      // gm~[r, p] = (GF[r, p] - sum_q mn[r, q] GF[r, q]) / Z with GF = gn-weighted channel sums
      // (GF here already carries 1/Z through gn), then the resize's transpose into [Hm, Wm].
      const int64_t Hm = masks.size(3), Wm = masks.size(4);
      const bool direct = masks.scalar_type() == acc;  // accumulate straight into the result
      at::Tensor gmb = direct ? gm.view({BT * R, Hm, Wm}).zero_()
                              : empty_output({BT * R, Hm, Wm}, masks.options().dtype(acc)).zero_();
      const auto ty = resize_taps<A>(Hm, H), tx = resize_taps<A>(Wm, W);
      // the loops below want each channel's H x W plane contiguous (or channels-last pixels)
      auto lay0 = feature_layout(features);
      const bool in_place = lay0 && (lay0->channels_last || lay0->sH == W);
      const at::Tensor f = in_place ? features : features.contiguous();
      const FeatLayout lay = *feature_layout(f);
      const std::vector<int64_t> off = image_offsets(f);
      const scalar_t* fp = f.data_ptr<scalar_t>();
      const A* zp = rm.inv_z.data_ptr<A>();
      A* gmp = gmb.data_ptr<A>();
      const A* gfr_in = gfr.defined() ? gfr.data_ptr<A>() : nullptr;
      parallel_tasks(BT, static_cast<double>(BT) * R * HW * (gfr_in ? 8 : C), [&](int64_t b0, int64_t b1) {
        std::vector<A> gf_local(gfr_in ? 0 : R * HW);
        for (int64_t bt = b0; bt < b1; ++bt) {
          const A* gframe = gfr_in ? gfr_in + bt * R * HW : gf_local.data();
          if (!gfr_in) {
            const scalar_t* base = fp + off[bt];
            const A* g = gp + bt * R * C;
            std::fill(gf_local.begin(), gf_local.end(), A(0));
            if (lay.channels_last) {
              for (int64_t p = 0; p < HW; ++p) {
                const scalar_t* pix = base + (p / W) * lay.sH + (p % W) * lay.sW;
                for (int64_t r = 0; r < R; ++r) gf_local[r * HW + p] = dot(g + r * C, pix, C);
              }
            } else {
              for (int64_t c = 0; c < C; ++c) {
                const scalar_t* plane = base + c * lay.sC;
                for (int64_t r = 0; r < R; ++r) axpy(g[r * C + c], plane, gf_local.data() + r * HW, HW);
              }
            }
          }
          for (int64_t r = 0; r < R; ++r) {
            const int64_t m = bt * R + r;
            const A* gr = gframe + r * HW;
            // mean term: sum_q (mt/Z)[q] * GF[q]
            A s = 0;
            for (int64_t q = 0; q < HW; ++q) s += mp[m * HW + q] * gr[q];
            s *= zp[m];
            A* dst = gmp + m * Hm * Wm;
            for (int64_t y = 0; y < H; ++y) {
              const ResizeTap<A>& a = ty[y];
              for (int64_t x = 0; x < W; ++x) {
                const ResizeTap<A>& c = tx[x];
                const A v = gr[y * W + x] - s;
                dst[a.lo * Wm + c.lo] += a.w_lo * c.w_lo * v;
                dst[a.lo * Wm + c.hi] += a.w_lo * c.w_hi * v;
                dst[a.hi * Wm + c.lo] += a.w_hi * c.w_lo * v;
                dst[a.hi * Wm + c.hi] += a.w_hi * c.w_hi * v;
              }
            }
          }
        }
      });
      if (!direct) gm.copy_(gmb.view(masks.sizes()));
    }
  });
  return {gf, gm};
}

// ---- the GPU deterministic backward's shared math (regional_math.h), run on the CPU for the tests ----
// The entries of the sorted-by-pixel RoI backward for boxes [K, 4] (fp32 / fp64) on images roi_img
// [K] (outside [0, images): skipped), in list order (RoI, then sample, then tap): (keys, gradient
// rows, weights), 4 per sample. The CUDA kernels build the same list with the same functions.
std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_backward_entries_cpu(const at::Tensor& boxes,
                                                                        const at::Tensor& roi_img, double spatial_scale,
                                                                        int64_t ph, int64_t pw, int64_t sampling_ratio,
                                                                        bool aligned, int64_t images, int64_t H,
                                                                        int64_t W) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "_roi_backward_entries: boxes must be [K, 4], got ",
              boxes.sizes());
  TORCH_CHECK(boxes.scalar_type() == at::kFloat || boxes.scalar_type() == at::kDouble,
              "_roi_backward_entries: boxes must be float32 or float64, got ", boxes.scalar_type());
  TORCH_CHECK(roi_img.dim() == 1 && roi_img.size(0) == boxes.size(0) && roi_img.scalar_type() == at::kLong,
              "_roi_backward_entries: roi_img must be int64 [K] with K = ", boxes.size(0));
  check_pool_params(ph, pw, sampling_ratio, "_roi_backward_entries");
  const at::Tensor b = boxes.contiguous(), img = roi_img.contiguous();
  const int64_t K = b.size(0), P = ph * pw, npix = images * H * W;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "_roi_backward_entries", [&] {
    using A = scalar_t;
    const A* bx = b.data_ptr<A>();
    const int64_t* ki = img.data_ptr<int64_t>();
    std::vector<RoiGeom<A>> geo(K);
    int64_t total = 0;
    for (int64_t k = 0; k < K; ++k) {
      geo[k] = roi_geometry<A>(bx[4 * k], bx[4 * k + 1], bx[4 * k + 2], bx[4 * k + 3], static_cast<A>(spatial_scale),
                               aligned, ph, pw, sampling_ratio);
      if (ki[k] >= 0 && ki[k] < images) total += geo[k].grid_h * geo[k].grid_w * P;
    }
    at::Tensor keys = at::empty({4 * total}, img.options()), rows = at::empty({4 * total}, img.options());
    at::Tensor w = at::empty({4 * total}, b.options());
    int64_t* kp = keys.data_ptr<int64_t>();
    int64_t* rp = rows.data_ptr<int64_t>();
    A* wp = w.data_ptr<A>();
    int64_t e = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (ki[k] < 0 || ki[k] >= images) continue;
      const int64_t n = geo[k].grid_h * geo[k].grid_w * P;
      for (int64_t s = 0; s < n; ++s, e += 4) {
        roi_sample_entries<A>(geo[k], s, pw, H, W, ki[k], npix, kp + e, wp + e);
        rp[e] = rp[e + 1] = rp[e + 2] = rp[e + 3] = k * P + roi_sample_index(s, geo[k].grid_h, geo[k].grid_w).q;
      }
    }
    result = {keys, rows, w};
  });
  return result;
}

// The grid.y / grid.z size the CUDA launchers use for `rows` rows (frames, masks, tiles).
int64_t regional_grid_rows(int64_t rows) { return grid_rows(rows); }

}  // namespace

// The schemas of the public ops are declared in rgpt4d/ops/regional.py (rgpt4d/ops/registry.py);
// this file registers their CPU kernels. Internal ops, for the CPU tests of the shared device math:
TORCH_LIBRARY_FRAGMENT(rgpt4d, m) {
  m.def(
      "_roi_backward_entries(Tensor boxes, Tensor roi_img, float spatial_scale, int ph, int pw, int sampling_ratio, "
      "bool aligned, int images, int H, int W) -> (Tensor, Tensor, Tensor)");
  m.def("_regional_grid_rows(int rows) -> int", &regional_grid_rows);
}

TORCH_LIBRARY_IMPL(rgpt4d, CPU, m) {
  m.impl("roi_align", &roi_align_cpu);
  m.impl("roi_align_backward", &roi_align_backward_cpu);
  m.impl("region_pool", &region_pool_cpu);
  m.impl("region_pool_backward", &region_pool_backward_cpu);
  m.impl("mask_pool", &mask_pool_cpu);
  m.impl("mask_pool_backward", &mask_pool_backward_cpu);
  m.impl("_roi_backward_entries", &roi_backward_entries_cpu);
}

}  // namespace rgpt4d
