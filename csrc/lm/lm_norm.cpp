// RMSNorm and SwiGLU of the student's LLM (Qwen2): the CPU kernels (schemas: rgpt4d/ops/lm.py).
//
//   rms_norm(x [N, D], weight [D], eps) -> (y [N, D] (promote(x, weight) dtype), rstd [N] float32/64)
//     Qwen2RMSNorm, one pass per row: rstd = 1 / sqrt(mean(x^2) + eps) in float32 (float64 for
//     float64), n = (x * rstd) rounded to x's dtype, y = weight * n (as the module's
//     `weight * hidden_states.to(input_dtype)`).
//   rms_norm_backward(grad_y, x, weight, rstd, need_x, need_w) -> (grad_x or [0], grad_w (acc) or [0])
//     xhat = x * rstd, g = grad_y * weight: grad_x = rstd * (g - xhat * mean(g * xhat)),
//     grad_w = sum over rows of grad_y * xhat (per-block partial sums, added in block order:
//     deterministic, independent of the thread count).
//   swiglu(gate, up) -> silu(gate) * up;  swiglu_backward(grad, gate, up) -> (grad_gate, grad_up)
//     Qwen2MLP's act_fn(gate_proj(x)) * up_proj(x) in one pass (forward) and one pass (backward).
//   rope(q [B, H, L, D], k [B, Hk, L, D], cos [B, L, D], sin [B, L, D]) -> (q_embed, k_embed)
//     transformers' apply_rotary_pos_emb (unsqueeze_dim=1): x * cos + rotate_half(x) * sin, for q
//     and k in one op. q / k may be any strided views whose last dimension is contiguous (the
//     attention's view(...).transpose(1, 2)); outputs have q's / k's layout (empty_like).
//   rope_backward(grad_q, grad_k, cos, sin) -> (grad_q_in, grad_k_in): the transposed rotation.
// float32 rows run the vectorised loops of lm_cpu_loops.h; other dtypes a scalar loop in float32
// (float64 for float64).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "common/acc.h"
#include "common/hd.h"
#include "lm/lm_cpu_loops.h"
#include "lm/lm_math.h"

namespace rgpt4d {
namespace {

void check_rms(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), op,
              ": need x [N, D] and weight [D], got x ", x.sizes(), " and weight ", weight.sizes());
  TORCH_CHECK(x.is_floating_point() && weight.is_floating_point(), op, ": x and weight must be floating tensors");
  TORCH_CHECK(x.device() == weight.device(), op, ": x and weight must be on one device");
}

template <typename T, typename W, typename O>
void rms_fwd_rows(const T* x, const W* w, O* y, acc_t<T>* rstd, int64_t N, int64_t D, double eps) {
  using A = acc_t<T>;
  at::parallel_for(0, N, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      A ss = 0;
      if constexpr (std::is_same<T, float>::value) {
        ss = cpu::sumsq_f32(xr, D);
      } else {
        for (int64_t d = 0; d < D; ++d) {
          const A v = static_cast<A>(xr[d]);
          ss += v * v;
        }
      }
      const A rs = A(1) / std::sqrt(ss / static_cast<A>(D > 0 ? D : 1) + static_cast<A>(eps));
      rstd[r] = rs;
      O* yr = y + r * D;
      if constexpr (std::is_same<T, float>::value && std::is_same<W, float>::value && std::is_same<O, float>::value) {
        cpu::rms_row_f32(xr, w, rs, yr, D);
        continue;
      }
      for (int64_t d = 0; d < D; ++d) {
        const T n = static_cast<T>(static_cast<A>(xr[d]) * rs);  // rounded to x's dtype, as the module
        yr[d] = static_cast<O>(static_cast<A>(w[d]) * static_cast<A>(n));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  check_rms(x_in, weight_in, "rms_norm");
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1);
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::ScalarType out_t = at::promote_types(x.scalar_type(), w.scalar_type());
  at::Tensor y = at::empty({N, D}, x.options().dtype(out_t));
  at::Tensor rstd = at::empty({N}, x.options().dtype(acc));
  if (N == 0) return {y, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_x", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "rms_norm_w", [&] {
      using W = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_t, "rms_norm_y", [&] {
        rms_fwd_rows<T, W, scalar_t>(x.data_ptr<T>(), w.data_ptr<W>(), y.data_ptr<scalar_t>(),
                                     rstd.data_ptr<acc_t<T>>(), N, D, eps);
      });
    });
  });
  return {y, rstd};
}

constexpr int64_t kRowBlock = 64;  // rows per partial sum of grad_w (fixed: deterministic)

template <typename G, typename T, typename W>
void rms_bwd_rows(const G* gy, const T* x, const W* w, const acc_t<T>* rstd, T* gx, acc_t<T>* gw, int64_t N,
                  int64_t D) {
  using A = acc_t<T>;
  const int64_t nblk = (N + kRowBlock - 1) / kRowBlock;
  std::vector<A> partial(gw ? nblk * D : 0, A(0));
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      A* pw = gw ? partial.data() + b * D : nullptr;
      for (int64_t r = b * kRowBlock; r < std::min(N, (b + 1) * kRowBlock); ++r) {
        const G* gr = gy + r * D;
        const T* xr = x + r * D;
        const A rs = rstd[r];
        constexpr bool f32 = std::is_same<G, float>::value && std::is_same<T, float>::value &&
                             std::is_same<W, float>::value;
        if constexpr (f32) {
          if (gx) {
            const float c = cpu::dot3_f32(gr, w, xr, D) * rs * rs / static_cast<float>(D);
            cpu::rms_grad_row_f32(gr, w, xr, rs, c, gx + r * D, D);
          }
          if (pw) cpu::rms_gw_row_f32(gr, xr, rs, pw, D);
          continue;
        }
        if (gx) {
          A dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += static_cast<A>(gr[d]) * static_cast<A>(w[d]) * static_cast<A>(xr[d]);
          const A c = dot * rs / static_cast<A>(D);  // mean(g * xhat) / rstd ... times rstd below
          T* gxr = gx + r * D;
          for (int64_t d = 0; d < D; ++d)
            gxr[d] = static_cast<T>(rs * (static_cast<A>(gr[d]) * static_cast<A>(w[d]) - static_cast<A>(xr[d]) * rs * c));
        }
        if (pw)
          for (int64_t d = 0; d < D; ++d) pw[d] += static_cast<A>(gr[d]) * static_cast<A>(xr[d]) * rs;
      }
    }
  });
  if (gw) {
    for (int64_t d = 0; d < D; ++d) gw[d] = 0;
    for (int64_t b = 0; b < nblk; ++b)
      for (int64_t d = 0; d < D; ++d) gw[d] += partial[b * D + d];
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                         const at::Tensor& weight_in, const at::Tensor& rstd_in,
                                                         bool need_x, bool need_w) {
  check_rms(x_in, weight_in, "rms_norm_backward");
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), "rms_norm_backward: grad_y must be ", x_in.sizes(), ", got ",
              grad_y.sizes());
  const at::ScalarType acc = acc_type(x_in.scalar_type());
  TORCH_CHECK(rstd_in.dim() == 1 && rstd_in.size(0) == x_in.size(0) && rstd_in.scalar_type() == acc,
              "rms_norm_backward: rstd must be [N] in ", acc);
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous(), gy = grad_y.contiguous(),
                   rstd = rstd_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor gx = need_x ? at::empty({N, D}, x.options()) : at::empty({0}, x.options());
  at::Tensor gw = need_w ? at::zeros({D}, x.options().dtype(acc)) : at::empty({0}, x.options().dtype(acc));
  if (N == 0 || !(need_x || need_w)) return {gx, gw};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd_x", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "rms_norm_bwd_w", [&] {
      using W = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gy.scalar_type(), "rms_norm_bwd_g", [&] {
        rms_bwd_rows<scalar_t, T, W>(gy.data_ptr<scalar_t>(), x.data_ptr<T>(), w.data_ptr<W>(),
                                     rstd.data_ptr<acc_t<T>>(), need_x ? gx.data_ptr<T>() : nullptr,
                                     need_w ? gw.data_ptr<acc_t<T>>() : nullptr, N, D);
      });
    });
  });
  return {gx, gw};
}

void check_swiglu(const at::Tensor& gate, const at::Tensor& up, const char* op) {
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type() && gate.is_floating_point() &&
                  gate.device() == up.device(),
              op, ": gate and up must be floating tensors of one shape, dtype and device, got ", gate.sizes(), " ",
              gate.scalar_type(), " and ", up.sizes(), " ", up.scalar_type());
}

at::Tensor swiglu_cpu(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_swiglu(gate_in, up_in, "swiglu");
  const at::Tensor g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor y = at::empty(g.sizes(), g.options());
  const int64_t n = g.numel();
  if (n == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
      if constexpr (std::is_same<scalar_t, float>::value) {
        // (reinterpret_cast: this branch is discarded for other types, but the lambda is not a template)
        cpu::swiglu_fwd_f32(reinterpret_cast<const float*>(gp) + i0, reinterpret_cast<const float*>(up) + i0,
                            reinterpret_cast<float*>(yp) + i0, i1 - i0);
        return;
      }
      for (int64_t i = i0; i < i1; ++i) {
        const A gv = static_cast<A>(gp[i]);
        // as F.silu(gate) * up: silu rounded to the dtype, then the product
        const scalar_t s = static_cast<scalar_t>(gv * lm_sigmoid<A>(gv));
        yp[i] = static_cast<scalar_t>(static_cast<A>(s) * static_cast<A>(up[i]));
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& gate_in,
                                                       const at::Tensor& up_in) {
  check_swiglu(gate_in, up_in, "swiglu_backward");
  TORCH_CHECK(grad_in.sizes() == gate_in.sizes(), "swiglu_backward: grad must be ", gate_in.sizes());
  const at::Tensor g = gate_in.contiguous(), u = up_in.contiguous(), gy = grad_in.to(g.scalar_type()).contiguous();
  at::Tensor dg = at::empty(g.sizes(), g.options()), du = at::empty(g.sizes(), g.options());
  const int64_t n = g.numel();
  if (n == 0) return {dg, du};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu_backward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t* gyp = gy.data_ptr<scalar_t>();
    scalar_t* dgp = dg.data_ptr<scalar_t>();
    scalar_t* dup = du.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
      if constexpr (std::is_same<scalar_t, float>::value) {
        cpu::swiglu_bwd_f32(reinterpret_cast<const float*>(gyp) + i0, reinterpret_cast<const float*>(gp) + i0,
                            reinterpret_cast<const float*>(up) + i0, reinterpret_cast<float*>(dgp) + i0,
                            reinterpret_cast<float*>(dup) + i0, i1 - i0);
        return;
      }
      for (int64_t i = i0; i < i1; ++i) {
        A a, b;
        swiglu_grads<A>(static_cast<A>(gp[i]), static_cast<A>(up[i]), static_cast<A>(gyp[i]), &a, &b);
        dgp[i] = static_cast<scalar_t>(a);
        dup[i] = static_cast<scalar_t>(b);
      }
    });
  });
  return {dg, du};
}

// ---- RoPE ------------------------------------------------------------------------------------
void check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && cos.dim() == 3 && sin.sizes() == cos.sizes(), op,
              ": need q [B, H, L, D], k [B, Hk, L, D], cos and sin [B, L, D], got q ", q.sizes(), ", k ", k.sizes(),
              ", cos ", cos.sizes(), ", sin ", sin.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3) &&
                  (cos.size(0) == q.size(0) || cos.size(0) == 1) && cos.size(1) == q.size(2) &&
                  cos.size(2) == q.size(3),
              op, ": q ", q.sizes(), ", k ", k.sizes(), " and cos/sin ", cos.sizes(), " do not match");
  TORCH_CHECK(q.size(3) % 2 == 0, op, ": the head dimension must be even, got ", q.size(3));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.is_floating_point(), op,
              ": q and k must be floating tensors of one dtype");
  TORCH_CHECK(q.device() == k.device() && cos.device() == q.device() && sin.device() == q.device(), op,
              ": all tensors must be on one device");
}

// rows of x [B, H, L, D] (last dim contiguous) -> out (same sizes, own strides); cos/sin [Bc, L, D]
// contiguous in x's dtype.
template <typename T>
void rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out, bool backward) {
  using A = acc_t<T>;
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3), h = D / 2;
  const int64_t Bc = cos.size(0);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const auto xs = x.strides(), os = out.strides();
  at::parallel_for(0, B * H * L, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t l = r % L, bh = r / L, hh = bh % H, b = bh / H;
      const T* xr = xp + b * xs[0] + hh * xs[1] + l * xs[2];
      T* orow = op + b * os[0] + hh * os[1] + l * os[2];
      const int64_t cb = Bc == 1 ? 0 : b;
      const T* c = cp + (cb * L + l) * D;
      const T* s = sp + (cb * L + l) * D;
      if constexpr (std::is_same<T, float>::value) {
        if (backward) cpu::rope_grad_row_f32(xr, c, s, orow, h);
        else cpu::rope_row_f32(xr, c, s, orow, h);
        continue;
      }
      for (int64_t i = 0; i < h; ++i) {
        const A x1 = static_cast<A>(xr[i]), x2 = static_cast<A>(xr[i + h]);
        if (backward) {
          orow[i] = static_cast<T>(x1 * static_cast<A>(c[i]) + x2 * static_cast<A>(s[i + h]));
          orow[i + h] = static_cast<T>(x2 * static_cast<A>(c[i + h]) - x1 * static_cast<A>(s[i]));
        } else {
          orow[i] = static_cast<T>(x1 * static_cast<A>(c[i]) - x2 * static_cast<A>(s[i]));
          orow[i + h] = static_cast<T>(x2 * static_cast<A>(c[i + h]) + x1 * static_cast<A>(s[i + h]));
        }
      }
    }
  });
}

at::Tensor rope_input(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

std::tuple<at::Tensor, at::Tensor> rope_run(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos_in,
                                            const at::Tensor& sin_in, bool backward) {
  check_rope(q_in, k_in, cos_in, sin_in, backward ? "rope_backward" : "rope");
  const at::Tensor q = rope_input(q_in), k = rope_input(k_in);
  const at::Tensor cos = cos_in.to(q.scalar_type()).contiguous(), sin = sin_in.to(q.scalar_type()).contiguous();
  // outputs in the inputs' layout when it is dense (the attention's transposed views), else contiguous
  at::Tensor qo = at::empty_like(q), ko = at::empty_like(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope", [&] {
    if (q.numel() > 0) rope_apply<scalar_t>(q, cos, sin, qo, backward);
    if (k.numel() > 0) rope_apply<scalar_t>(k, cos, sin, ko, backward);
  });
  return {qo, ko};
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin) {
  return rope_run(q, k, cos, sin, false);
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cpu(const at::Tensor& gq, const at::Tensor& gk, const at::Tensor& cos,
                                                     const at::Tensor& sin) {
  return rope_run(gq, gk, cos, sin, true);
}

}  // namespace

// The ops' schemas are declared in rgpt4d/ops/lm.py (rgpt4d/ops/registry.py); this file registers
// their CPU kernels.

TORCH_LIBRARY_IMPL(rgpt4d, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
  m.impl("rope", &rope_cpu);
  m.impl("rope_backward", &rope_backward_cpu);
}

}  // namespace rgpt4d
