// Timestamp Positional Encoding math, shared by the CPU and CUDA kernels.
//   p[2i]   = sin(t / base^(2i/D))
//   p[2i+1] = cos(t / base^(2i/D))
// Channel d uses the frequency of its pair (2i = d rounded down to even). For odd D the last
// channel is a sine. Computed in the accumulation type (float, or double for float64 inputs).
#pragma once

#include "common/hd.h"

namespace rgpt4d {

template <typename acc_t>
RGPT4D_HD acc_t tpe_inv_freq(int64_t d, int64_t D, acc_t log_base) {
  const int64_t two_i = d - (d & 1);
  return exp(-(static_cast<acc_t>(two_i) / static_cast<acc_t>(D)) * log_base);
}

template <typename acc_t>
RGPT4D_HD acc_t tpe_value(acc_t t, int64_t d, int64_t D, acc_t log_base) {
  const acc_t a = t * tpe_inv_freq<acc_t>(d, D, log_base);
  return (d & 1) ? cos(a) : sin(a);
}

// Output-token geometry of the fused downsample: window x window neighbourhoods of an h x w
// grid, zero-padded at the bottom/right, row-major over the (ceil(h/win) x ceil(w/win)) grid.
// Inside an output token, channel (dy*win + dx)*D + d holds feature d of grid cell
// (oy*win + dy, ox*win + dx).
struct DsGeom {
  int64_t h, w, win, D;
  int64_t Ho, Wo;  // downsampled grid
  RGPT4D_HD int64_t M() const { return Ho * Wo; }          // output tokens per frame
  RGPT4D_HD int64_t K() const { return win * win * D; }    // channels per output token
  // Source token (row-major over h x w) of window slot j in output token o, or -1 for padding.
  RGPT4D_HD int64_t source(int64_t o, int64_t j) const {
    const int64_t oy = o / Wo, ox = o - (o / Wo) * Wo;
    const int64_t y = oy * win + j / win, x = ox * win + (j - (j / win) * win);
    return (y < h && x < w) ? y * w + x : -1;
  }
};

RGPT4D_HD DsGeom make_ds_geom(int64_t h, int64_t w, int64_t win, int64_t D) {
  DsGeom g;
  g.h = h; g.w = w; g.win = win; g.D = D;
  g.Ho = (h + win - 1) / win;
  g.Wo = (w + win - 1) / win;
  return g;
}

}  // namespace rgpt4d
