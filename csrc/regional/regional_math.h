// Regional pooling math, shared by the CPU and CUDA kernels (RGPT4D_HD: host and device).
//
// RoIAlign (torchvision semantics). A RoI (x1, y1, x2, y2) in input coordinates is scaled by
// spatial_scale and, with aligned=True, shifted by -0.5 (pixel centres at integer + 0.5). Without
// `aligned` its width/height are clamped to >= 1. It is cut into ph x pw bins; bin (i, j) averages
// grid_h x grid_w bilinear samples at the centres of a regular sub-grid:
//     y = y1 + i * bin_h + (iy + 0.5) * bin_h / grid_h        (x likewise)
// grid = sampling_ratio if > 0, else ceil(roi_size / pooled_size) (adaptive). The average divides
// by max(grid_h * grid_w, 1). A sample with y < -1 or y > H (or x < -1 or x > W) contributes 0;
// otherwise the coordinate is clamped to >= 0 and interpolated between rows lo = floor(y) and
// lo + 1, both clamped to H - 1.
//
// Everything above is separable: a sample's weight on pixel (py, px) is wy(py) * wx(px), and the
// "outside" test is (y outside) or (x outside). The kernels use that: per RoI they build, for each
// output row i, the merged row taps {(py, sum of wy over the bin's samples)} and, for each output
// column j, the merged column taps; bin (i, j) is then the sum over row taps x column taps of
// wy * wx * f(py, px) / count. That is never more taps than the 4 per sample of the direct form
// (and far fewer for large adaptive bins, where neighbouring samples share pixels).
//
// Bilinear resize (F.interpolate(mode="bilinear", align_corners=False), no antialias): output
// pixel o of an axis of length n_out reads source src = max((o + 0.5) * (n_in / n_out) - 0.5, 0),
// lo = min(floor(src), n_in - 1), hi = lo + (lo < n_in - 1), weight of hi = src - lo.
//
// Non-finite RoI coordinates: the RoI yields zeros (output and gradient). See roi_geometry.
#pragma once

#include "common/hd.h"

namespace rgpt4d {

// One sample's two taps along one axis. valid=false: the sample lies outside and contributes 0.
template <typename A>
struct AxisTap {
  int64_t lo, hi;
  A w_lo, w_hi;
  bool valid;
};

template <typename A>
RGPT4D_HD AxisTap<A> roi_axis_tap(A v, int64_t size) {
  AxisTap<A> t;
  t.lo = t.hi = 0;
  t.w_lo = t.w_hi = A(0);
  t.valid = !(v < A(-1) || v > static_cast<A>(size)) && size > 0;
  if (!t.valid) return t;
  if (v < A(0)) v = A(0);
  int64_t lo = static_cast<int64_t>(v);  // v >= 0: truncation is floor
  int64_t hi;
  if (lo >= size - 1) {
    lo = hi = size - 1;
    v = static_cast<A>(lo);
  } else {
    hi = lo + 1;
  }
  const A l = v - static_cast<A>(lo);
  t.lo = lo;
  t.hi = hi;
  t.w_lo = A(1) - l;
  t.w_hi = l;
  return t;
}

// Geometry of one RoI (after scaling / alignment), for one output grid.
template <typename A>
struct RoiGeom {
  A y0, x0;          // top-left corner
  A bin_h, bin_w;    // bin size
  int64_t grid_h, grid_w;
  A inv_count;       // 1 / max(grid_h * grid_w, 1)
  bool finite;       // false: some coordinate is nan/inf -> the RoI yields zeros
};

// Adaptive grid: ceil(roi / pooled), computed in A, clamped to [0, 2^30] before the integer
// conversion so absurd boxes cannot overflow (torchvision would loop for ever on them anyway).
template <typename A>
RGPT4D_HD int64_t roi_grid(A roi_size, int64_t pooled, int64_t sampling_ratio) {
  if (sampling_ratio > 0) return sampling_ratio;
  A g = ceil(roi_size / static_cast<A>(pooled));
  if (!(g > A(0))) return 0;  // negative, zero or nan
  if (g > A(1 << 30)) g = A(1 << 30);
  return static_cast<int64_t>(g);
}

template <typename A>
RGPT4D_HD bool roi_all_finite(A a, A b, A c, A d) {
  // isfinite without <cmath> overloads on device: x - x is 0 only for finite x.
  return (a - a == A(0)) && (b - b == A(0)) && (c - c == A(0)) && (d - d == A(0));
}

template <typename A>
RGPT4D_HD RoiGeom<A> roi_geometry(A bx1, A by1, A bx2, A by2, A spatial_scale, bool aligned, int64_t ph,
                                  int64_t pw, int64_t sampling_ratio) {
  RoiGeom<A> g;
  const A off = aligned ? A(0.5) : A(0);
  g.x0 = bx1 * spatial_scale - off;
  g.y0 = by1 * spatial_scale - off;
  const A x1 = bx2 * spatial_scale - off;
  const A y1 = by2 * spatial_scale - off;
  A roi_w = x1 - g.x0, roi_h = y1 - g.y0;
  if (!aligned) {
    if (roi_w < A(1)) roi_w = A(1);
    if (roi_h < A(1)) roi_h = A(1);
  }
  g.finite = roi_all_finite(g.x0, g.y0, x1, y1);
  g.bin_h = roi_h / static_cast<A>(ph);
  g.bin_w = roi_w / static_cast<A>(pw);
  g.grid_h = g.finite ? roi_grid<A>(roi_h, ph, sampling_ratio) : 0;
  g.grid_w = g.finite ? roi_grid<A>(roi_w, pw, sampling_ratio) : 0;
  const int64_t count = g.grid_h * g.grid_w;
  g.inv_count = A(1) / static_cast<A>(count > 1 ? count : 1);
  return g;
}

// Coordinate of sample s (0 <= s < grid) of bin `cell` along one axis.
template <typename A>
RGPT4D_HD A roi_sample_coord(A start, A bin, int64_t cell, int64_t s, int64_t grid) {
  return start + static_cast<A>(cell) * bin + (static_cast<A>(s) + A(0.5)) * bin / static_cast<A>(grid);
}

// ---- Deterministic RoI backward (GPU): entries sorted by target pixel ------------------------------
// Every bilinear tap of every sample becomes an entry (key, gradient row, weight); the entries are
// sorted by key (a stable sort: a fixed order) and each pixel's entries are summed in that order by
// the one thread that owns the pixel. Sample s (0 <= s < ph * pw * grid_h * grid_w) of a RoI is bin
// q = s / (grid_h * grid_w), then sample row iy, then sample column ix; its taps are entries 4 s + t
// (t = lo/lo, lo/hi, hi/lo, hi/hi). A key is image * H * W + y * W + x, or npix (= images * H * W, past
// every pixel) for a sample outside the map; the gradient row is k * ph * pw + q.
struct RoiSampleIndex {
  int64_t q, iy, ix;
};

RGPT4D_HD RoiSampleIndex roi_sample_index(int64_t s, int64_t grid_h, int64_t grid_w) {
  const int64_t ng = grid_h * grid_w > 0 ? grid_h * grid_w : 1;
  RoiSampleIndex r;
  r.q = s / ng;
  const int64_t rest = s - r.q * ng;
  r.iy = grid_w > 0 ? rest / grid_w : 0;
  r.ix = rest - r.iy * grid_w;
  return r;
}

// The 4 entries of sample s of a RoI (geometry g) on image img: keys and weights (row: k * P + q).
template <typename A>
RGPT4D_HD void roi_sample_entries(const RoiGeom<A>& g, int64_t s, int64_t pw, int64_t H, int64_t W, int64_t img,
                                  int64_t npix, int64_t* key, A* w) {
  const RoiSampleIndex r = roi_sample_index(s, g.grid_h, g.grid_w);
  const int64_t i = r.q / pw, j = r.q - (r.q / pw) * pw;
  const AxisTap<A> ty = roi_axis_tap<A>(roi_sample_coord<A>(g.y0, g.bin_h, i, r.iy, g.grid_h), H);
  const AxisTap<A> tx = roi_axis_tap<A>(roi_sample_coord<A>(g.x0, g.bin_w, j, r.ix, g.grid_w), W);
  const bool valid = ty.valid && tx.valid;
  const int64_t base = img * H * W;
  key[0] = valid ? base + ty.lo * W + tx.lo : npix;
  key[1] = valid ? base + ty.lo * W + tx.hi : npix;
  key[2] = valid ? base + ty.hi * W + tx.lo : npix;
  key[3] = valid ? base + ty.hi * W + tx.hi : npix;
  w[0] = ty.w_lo * tx.w_lo * g.inv_count;
  w[1] = ty.w_lo * tx.w_hi * g.inv_count;
  w[2] = ty.w_hi * tx.w_lo * g.inv_count;
  w[3] = ty.w_hi * tx.w_hi * g.inv_count;
}

// CUDA grid.y / grid.z hold at most 65535 blocks: a launch over `rows` rows (frames, masks) puts
// grid_rows(rows) blocks there and each block strides over rows blockIdx.y, + gridDim.y, ...
constexpr int64_t kMaxGridRows = 65535;
RGPT4D_HD int64_t grid_rows(int64_t rows) { return rows < 1 ? 1 : (rows < kMaxGridRows ? rows : kMaxGridRows); }

// Bilinear resize along one axis (align_corners=False, as F.interpolate).
template <typename A>
struct ResizeTap {
  int64_t lo, hi;
  A w_lo, w_hi;
};

template <typename A>
RGPT4D_HD ResizeTap<A> resize_axis_tap(int64_t o, int64_t n_in, int64_t n_out) {
  const A scale = static_cast<A>(n_in) / static_cast<A>(n_out);
  A src = scale * (static_cast<A>(o) + A(0.5)) - A(0.5);
  if (src < A(0)) src = A(0);
  int64_t lo = static_cast<int64_t>(src);
  if (lo > n_in - 1) lo = n_in - 1;
  ResizeTap<A> t;
  t.lo = lo;
  t.hi = lo + (lo < n_in - 1 ? 1 : 0);
  A l = src - static_cast<A>(lo);
  if (l < A(0)) l = A(0);
  if (l > A(1)) l = A(1);
  t.w_lo = A(1) - l;
  t.w_hi = l;
  return t;
}

// Range of output pixels [first, last] whose resize taps may touch source pixel i (the gather
// form of the resize's transpose, for the mask gradient). Callers re-derive each candidate's
// taps and keep those that really read i.
RGPT4D_HD void resize_axis_candidates(int64_t i, int64_t n_in, int64_t n_out, int64_t* first, int64_t* last) {
  const double inv = static_cast<double>(n_out) / static_cast<double>(n_in);
  // o reads i when its (clamped) source lies in [i - 1, i + 1).
  int64_t a = static_cast<int64_t>(floor((static_cast<double>(i) - 0.5) * inv - 0.5)) - 1;
  int64_t b = static_cast<int64_t>(ceil((static_cast<double>(i) + 1.5) * inv - 0.5)) + 1;
  if (i == 0) a = 0;               // every output clamped to source 0
  if (i == n_in - 1) b = n_out - 1;  // every output clamped to the last source
  *first = a < 0 ? 0 : a;
  *last = b > n_out - 1 ? n_out - 1 : b;
}

}  // namespace rgpt4d
