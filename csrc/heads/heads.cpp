// Output stage of the teacher's dense (DPT-like) heads: the CPU kernels (schema: rgpt4d/ops/heads.py).
//
//   pixel_shuffle_act(x [N, C*r*r, H, W], upscale r, activation, clamp_max) -> y [N, C, H*r, W*r]
//     F.pixel_shuffle(x, r), then (activation 1) exp(min(y, clamp_max)) — the depth head's
//     activation. x may have any strides (the heads' convolutions give channels-last maps): it is
//     read in place, y is contiguous.
//   pixel_shuffle_act_backward(grad_y, x, upscale, activation, clamp_max) -> grad_x (x's layout)
//     The inverse shuffle of grad_y, times exp(min(x, clamp_max)) * (x <= clamp_max) for the exp
//     activation (recomputed from x: only x is kept for backward, not x and the output).
// The shuffle is a gather in plain loops (a slab-wise one for channels-last x, the heads' layout);
// the activation uses ATen's vectorised exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace rgpt4d {
namespace {

void check_shuffle(const at::Tensor& x, int64_t r, int64_t activation, const char* op) {
  TORCH_CHECK(x.dim() == 4 && x.is_floating_point(), op, ": x must be a floating [N, C*r*r, H, W] tensor, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(r >= 1, op, ": upscale must be >= 1, got ", r);
  TORCH_CHECK(x.size(1) % (r * r) == 0, op, ": x has ", x.size(1), " channels, not a multiple of upscale^2 = ", r * r);
  TORCH_CHECK(activation == 0 || activation == 1, op, ": activation must be 0 (none) or 1 (exp), got ", activation);
}

// dst [N, C, H*r, W*r] contiguous <-> src [N, C*r*r, H, W] with strides s (forward: gather into dst;
// backward: scatter dst's values back into src's positions).
// Generic strides: one output row (n, c, oh) per step, x read element by element.
template <typename T, bool kForward>
void shuffle_loop(T* big, T* small, at::IntArrayRef s, int64_t N, int64_t C, int64_t H, int64_t W, int64_t r) {
  const int64_t OH = H * r, OW = W * r;
  at::parallel_for(0, N * C * OH, std::max<int64_t>(1, 16384 / std::max<int64_t>(OW, 1)), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t oh = q % OH, nc = q / OH, c = nc % C, n = nc / C, h = oh / r, i = oh % r;
      T* row = big + q * OW;
      const int64_t base = n * s[0] + (c * r * r + i * r) * s[1] + h * s[2];
      for (int64_t j = 0; j < r; ++j) {
        T* plane = small + base + j * s[1];
        for (int64_t w = 0; w < W; ++w) {
          if constexpr (kForward) row[w * r + j] = plane[w * s[3]];
          else plane[w * s[3]] = row[w * r + j];
        }
      }
    }
  });
}

// Dense channels-last x ([N, H, W, C*r*r] in memory), the layout the heads' convolutions give:
// one (n, h) slab of x (W * C*r*r elements, a few KiB: stays in L1) per step, against the C*r
// output rows it maps to, each read or written sequentially in runs of r. The generic loop above
// touches x one element at a time with a stride of C*r*r: about 2x slower on the tiny teacher's
// depth head ([16, 32, 16, 16] channels-last, r = 4; benchmarks/bench_lm_heads.py).
// Backward with the exp activation: grad * e * (x <= clamp_max) with e = exp(min(x, c)),
// computed in x's layout right after the slab is written.
template <typename T, bool kForward, int kR>
void shuffle_channels_last(T* big, T* small, const T* x, const T* e, double clamp_max, int64_t N, int64_t C,
                           int64_t H, int64_t W, int64_t r_runtime) {
  // kR > 0: the upscale as a compile-time constant (the run of r elements becomes one fixed-size
  // move; with a runtime r the inner loop stays scalar: 1 MiB took 70 us at 2 threads, 4x a copy)
  const int64_t r = kR > 0 ? kR : r_runtime;
  const int64_t OH = H * r, OW = W * r, Crr = C * r * r, slab = W * Crr;
  const T cm = static_cast<T>(clamp_max);
  at::parallel_for(0, N * H, std::max<int64_t>(1, 32768 / std::max<int64_t>(slab, 1)), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n = q / H, h = q % H;
      T* sl = small + q * slab;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < r; ++i) {
          T* row = big + ((n * C + c) * OH + h * r + i) * OW;
          T* col = sl + (c * r + i) * r;
          for (int64_t w = 0; w < W; ++w) {
            for (int64_t j = 0; j < r; ++j) {
              if constexpr (kForward) row[w * r + j] = col[w * Crr + j];
              else col[w * Crr + j] = row[w * r + j];
            }
          }
        }
      }
      if constexpr (!kForward) {
        if (e != nullptr) {
          const T* xs = x + q * slab;
          const T* es = e + q * slab;
          for (int64_t k = 0; k < slab; ++k) sl[k] = xs[k] <= cm ? static_cast<T>(sl[k] * es[k]) : T(0);
        }
      }
    }
  });
}

// The channels-last shuffle with r specialised for the common upscales (2, 4, 8).
template <typename T, bool kForward>
void shuffle_channels_last_any(T* big, T* small, const T* x, const T* e, double clamp_max, int64_t N, int64_t C,
                               int64_t H, int64_t W, int64_t r) {
  switch (r) {
    case 2: return shuffle_channels_last<T, kForward, 2>(big, small, x, e, clamp_max, N, C, H, W, r);
    case 4: return shuffle_channels_last<T, kForward, 4>(big, small, x, e, clamp_max, N, C, H, W, r);
    case 8: return shuffle_channels_last<T, kForward, 8>(big, small, x, e, clamp_max, N, C, H, W, r);
    default: return shuffle_channels_last<T, kForward, 0>(big, small, x, e, clamp_max, N, C, H, W, r);
  }
}

bool dense_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && x.size(1) > 1 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

at::Tensor pixel_shuffle_act_cpu(const at::Tensor& x, int64_t r, int64_t activation, double clamp_max) {
  check_shuffle(x, r, activation, "pixel_shuffle_act");
  const int64_t N = x.size(0), C = x.size(1) / (r * r), H = x.size(2), W = x.size(3);
  at::Tensor y = at::empty({N, C, H * r, W * r}, x.options());
  if (y.numel() > 0) {
    const bool cl = dense_channels_last(x);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pixel_shuffle_act", [&] {
      scalar_t* xp = const_cast<scalar_t*>(x.data_ptr<scalar_t>());
      if (cl) {
        shuffle_channels_last_any<scalar_t, true>(y.data_ptr<scalar_t>(), xp, nullptr, nullptr, clamp_max, N, C, H, W, r);
      } else {
        shuffle_loop<scalar_t, true>(y.data_ptr<scalar_t>(), xp, x.strides(), N, C, H, W, r);
      }
    });
  }
  if (activation == 1) y.clamp_max_(clamp_max).exp_();
  return y;
}

at::Tensor pixel_shuffle_act_backward_cpu(const at::Tensor& grad, const at::Tensor& x, int64_t r, int64_t activation,
                                          double clamp_max) {
  check_shuffle(x, r, activation, "pixel_shuffle_act_backward");
  const int64_t N = x.size(0), C = x.size(1) / (r * r), H = x.size(2), W = x.size(3);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({N, C, H * r, W * r}), "pixel_shuffle_act_backward: grad must be [",
              N, ", ", C, ", ", H * r, ", ", W * r, "], got ", grad.sizes());
  const at::Tensor g = grad.to(x.scalar_type()).contiguous();
  at::Tensor gx = at::empty_like(x);  // x's layout (channels-last stays channels-last)
  if (gx.numel() == 0) return gx;
  if (dense_channels_last(x)) {
    // exp(min(x, c)) in x's layout (ATen's vectorised exp), applied with the mask inside the slab loop
    const at::Tensor e = activation == 1 ? x.clamp_max(clamp_max).exp_() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pixel_shuffle_act_backward", [&] {
      shuffle_channels_last_any<scalar_t, false>(const_cast<scalar_t*>(g.data_ptr<scalar_t>()), gx.data_ptr<scalar_t>(),
                                             x.data_ptr<scalar_t>(), e.defined() ? e.data_ptr<scalar_t>() : nullptr,
                                             clamp_max, N, C, H, W, r);
    });
    return gx;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pixel_shuffle_act_backward", [&] {
    shuffle_loop<scalar_t, false>(const_cast<scalar_t*>(g.data_ptr<scalar_t>()), gx.data_ptr<scalar_t>(),
                                  gx.strides(), N, C, H, W, r);
  });
  if (activation == 1) gx.mul_(x.clamp_max(clamp_max).exp_().mul_(x.le(clamp_max)));
  return gx;
}

}  // namespace

// The ops' schemas are declared in rgpt4d/ops/heads.py (rgpt4d/ops/registry.py); this file registers
// their CPU kernels.

TORCH_LIBRARY_IMPL(rgpt4d, CPU, m) {
  m.impl("pixel_shuffle_act", &pixel_shuffle_act_cpu);
  m.impl("pixel_shuffle_act_backward", &pixel_shuffle_act_backward_cpu);
}

}  // namespace rgpt4d
