// P4D loss ops: the CPU kernels (schemas: rgpt4d/ops/p4d.py).
//
//   p4d_loss(preds[], targets[], masks[], mask_inner[], kinds[], betas[], flags[], weights[], mean, log_eps)
//       -> (total [], losses [n_terms], grads[])
//     One pass over every term: each pred/target element is read once; the loss partial sums
//     and (flag kP4DFlagGrad) the gradient of the total with respect to the prediction are
//     produced together. grads[i] = f_i * dL_i/dpred_i in pred's dtype and shape (f_i: the
//     term's weight, or 1 when it is 0), or an empty [0] tensor; the autograd backward rescales
//     it by grad_output. losses / total are float32 (float64 when a term is float64).
//     masks[i] (flag kP4DFlagMask): a bool tensor of `period` elements; element e of the term is
//     valid iff masks[i][(e / mask_inner[i]) % period] (the Python layer builds this layout
//     from any mask broadcastable to the prediction). mean: divide by the valid count (a term
//     with none gives loss 0 and gradient 0); else sum.
//   p4d_linear_loss(h[N, D_in], weight[D_out, D_in], bias?, target[N, D_out], mask[N]?, kind, beta,
//                   reduction, chunk_size, need_h_grad, need_w_grad, need_b_grad)
//       -> (loss, grad_h or [0], grad_w (acc) or [0], grad_b (acc) or [0])
//     The decoder's last Linear fused with the latent loss, chunked over tokens: the projected
//     [N, D_out] activation and its gradient never exist whole. reduction 0 none (per-token loss
//     [N], no gradient in forward), 1 mean, 2 sum (gradients in forward).
//   p4d_linear_loss_backward(grad_loss[N], h, weight, bias?, target, mask?, kind, beta, chunk_size,
//                            need_h_grad, need_w_grad, need_b_grad) -> (grad_h, grad_w, grad_b)
//     reduction none: recomputes the projection chunk by chunk with the per-token grad_output.
//
// Determinism: terms are cut into fixed blocks of kBlock elements; each block's partial sum is
// stored, then summed per term in block order (float64), so results do not depend on the number
// of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/runtime.h"
#include "p4d/p4d_common.h"
#include "p4d/p4d_cpu_loops.h"
#include "p4d/p4d_math.h"

namespace rgpt4d {
namespace {

constexpr int64_t kBlock = 8192;

// Large outputs (the gradients) come from rgpt4d::empty_output (cpu/alloc.h): cached
// blocks in warm pages, fresh ones advised for huge pages.

// ---- loads / stores between any float dtype and the accumulation type (cpu/vec.h rows) -----
// Returns a pointer to len elements of x (flattened, contiguous) from e0 as A: x's own memory
// when it already holds A and `copy` is false, else `buf` filled by conversion.
template <typename A>
const A* load_as(const at::Tensor& x, int64_t e0, int64_t len, A* buf, bool copy) {
  if (!copy && x.scalar_type() == c10::CppTypeToScalarType<A>::value) return x.data_ptr<A>() + e0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "p4d_load",
                                  [&] { cpu::load_row(x.data_ptr<scalar_t>() + e0, buf, len); });
  return buf;
}

// Where the kernel writes the gradient of len elements from e0: straight into g when g holds A.
template <typename A>
A* grad_dst(const at::Tensor& g, int64_t e0, A* buf) {
  if (g.scalar_type() == c10::CppTypeToScalarType<A>::value) return g.data_ptr<A>() + e0;
  return buf;
}

// The gradient computed into buf (g does not hold A) converted into g.
template <typename A>
void store_grad(const A* buf, const at::Tensor& g, int64_t e0, int64_t len) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "p4d_store",
                                  [&] { cpu::store_row(buf, g.data_ptr<scalar_t>() + e0, len); });
}

// mask bytes of elements [e0, e0 + len) under the canonical layout (runs, not per-element division).
const uint8_t* fill_mask(const uint8_t* flat, int64_t inner, int64_t period, int64_t numel, int64_t e0, int64_t len,
                         uint8_t* out) {
  if (inner == 1 && period == numel) return flat + e0;  // same shape as the prediction
  int64_t e = e0, k = 0;
  while (k < len) {
    const int64_t q = e / inner, idx = q % period;
    int64_t run;
    if (inner == 1) {
      run = std::min(len - k, period - idx);
      std::memcpy(out + k, flat + idx, static_cast<size_t>(run));
    } else {
      run = std::min(len - k, inner - (e - q * inner));
      std::memset(out + k, flat[idx], static_cast<size_t>(run));
    }
    k += run;
    e += run;
  }
  return out;
}

// Log space: p <- log(p + eps), t <- log(t + eps), chain = 1 / (p + eps). Masked-out elements
// may become NaN here; the loss loop selects them away.
template <typename A>
void to_log_space(A* p, A* t, A* chain, int64_t n, A eps) {
  for (int64_t i = 0; i < n; ++i) {
    const A pe = p[i] + eps;
    chain[i] = A(1) / pe;
    p[i] = std::log(pe);
    t[i] = std::log(t[i] + eps);
  }
}

// float64: the same math, plain loops.
template <int KIND>
double block_f64_kind(const double* p, const double* t, const uint8_t* m, const double* chain, double* g, int64_t n,
                      const P4DConsts<double>& c, double scale) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = p[i] - t[i];
    const bool ok = !m || m[i] != 0;
    s += ok ? p4d_elem_loss<KIND, double>(d, c) : 0.0;
    if (g) {
      double gr = p4d_elem_grad<KIND, double>(d, c) * scale;
      if (chain) gr *= chain[i];
      g[i] = ok ? gr : 0.0;
    }
  }
  return s;
}

double block_loss(int kind, const double* p, const double* t, const uint8_t* m, const double* chain, double* g,
                  double* /*l*/, int64_t n, const P4DConsts<double>& c, double scale, bool /*stream*/) {
  if (kind == kP4DSmoothL1) return block_f64_kind<kP4DSmoothL1>(p, t, m, chain, g, n, c, scale);
  if (kind == kP4DMSE) return block_f64_kind<kP4DMSE>(p, t, m, chain, g, n, c, scale);
  return block_f64_kind<kP4DL1>(p, t, m, chain, g, n, c, scale);
}

// The AVX2 loop where the CPU has it (RGPT4D_P4D_NO_AVX2=1 forces the generic one: tests
// compare the two).
bool use_avx2() {
#if defined(RGPT4D_P4D_AVX2)
  static const bool v = cpu_has_avx2() && std::getenv("RGPT4D_P4D_NO_AVX2") == nullptr;
  return v;
#else
  return false;
#endif
}

double block_loss(int kind, const float* p, const float* t, const uint8_t* m, const float* chain, float* g, float* l,
                  int64_t n, const P4DConsts<float>& c, float scale, bool stream) {
#if defined(RGPT4D_P4D_AVX2)
  if (use_avx2()) return cpu::p4d_block_f32_avx2(kind, p, t, m, chain, g, l, n, c, scale, stream);
#endif
  return cpu::p4d_block_f32(kind, p, t, m, chain, g, l, n, c, scale);
}

// Whether a call writes its gradients with non-temporal stores (AVX2 loop, float gradients):
// when the bytes it reads and writes are well beyond a last-level cache (cpu/stream.h),
// the gradients would be evicted before anyone reads them anyway.
using cpu::kStreamFootprint;

void stream_fence(bool stream) {
  if (stream) cpu::stream_fence();
}

template <typename A>
struct Scratch {
  // Uninitialised (every use writes before it reads): no zero-filling per parallel chunk.
  template <typename E>
  struct Buf {
    std::unique_ptr<E[]> v;
    explicit Buf(int64_t n) : v(new E[n]) {}
    E* data() { return v.get(); }
  };
  Buf<A> p{kBlock}, t{kBlock}, chain{kBlock}, g{kBlock}, l{cpu::kP4DSub};
  Buf<uint8_t> m{kBlock};
};

// Loss sum over elements [e0, e0 + len) of a term; writes their gradient when grad is defined.
template <typename A>
double term_block(const P4DTerm& T, const at::Tensor& grad, int64_t e0, int64_t len, A scale, A log_eps,
                  Scratch<A>& s, bool stream = false) {
  const P4DConsts<A> c = p4d_consts<A>(T.kind, T.beta);
  const bool log = T.log();
  const A* p = load_as<A>(T.pred, e0, len, s.p.data(), log);
  const A* t = load_as<A>(T.target, e0, len, s.t.data(), log);
  const A* chain = nullptr;
  if (log) {
    to_log_space<A>(s.p.data(), s.t.data(), s.chain.data(), len, log_eps);
    chain = s.chain.data();
  }
  const uint8_t* m = nullptr;
  if (T.has_mask()) {
    const uint8_t* flat = reinterpret_cast<const uint8_t*>(T.mask.data_ptr<bool>());
    m = fill_mask(flat, T.inner, T.period, T.numel, e0, len, s.m.data());
  }
  A* g = grad.defined() ? grad_dst<A>(grad, e0, s.g.data()) : nullptr;
  const double sum = block_loss(T.kind, p, t, m, chain, g, s.l.data(), len, c, scale, stream && g != s.g.data());
  if (g == s.g.data()) store_grad<A>(g, grad, e0, len);
  return sum;
}

// ---- host hooks of the shared code (p4d_common.h): plain loops, no ATen reductions -------
at::Tensor count_true_cpu(const at::Tensor& mask) {
  const at::Tensor m = mask.contiguous();
  const int64_t n = m.numel();
  const uint8_t* p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  // Fixed chunks counted in parallel, then added in order (integers: exact anyway).
  constexpr int64_t kChunk = int64_t(1) << 18;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> part(std::max<int64_t>(nchunks, 1), 0);
  // Grain 16 chunks (4 MiB): a smaller mask is counted on this thread, without a parallel region.
  at::parallel_for(0, nchunks, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) part[c] = cpu::p4d_count_u8(p + c * kChunk, std::min(kChunk, n - c * kChunk));
  });
  int64_t total = 0;
  for (int64_t v : part) total += v;
  return at::scalar_tensor(total, m.options().dtype(at::kLong));
}

at::Tensor sum_f64_cpu(const at::Tensor& v) {
  const at::Tensor c = v.contiguous();
  const double* p = c.data_ptr<double>();
  double s = 0.0;
  for (int64_t i = 0; i < c.numel(); ++i) s += p[i];  // in order
  return at::scalar_tensor(s, c.options());
}

void linear_rows_cpu(at::Tensor y, const at::Tensor& target, const at::Tensor& mask, const at::Tensor& row_scale,
                     const at::Tensor& scale, int kind, double beta, bool write_grad, at::Tensor row_loss);

const P4DHostOps kCpuOps{&count_true_cpu, &sum_f64_cpu, &empty_output, &linear_rows_cpu};

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> p4d_loss_cpu(
    at::TensorList preds, at::TensorList targets, at::TensorList masks, at::IntArrayRef mask_inner,
    at::IntArrayRef kinds, at::ArrayRef<double> betas, at::IntArrayRef flags, at::ArrayRef<double> weights,
    bool mean, double log_eps) {
  std::vector<P4DTerm> terms = p4d_check_terms(preds, targets, masks, mask_inner, kinds, betas, flags, weights);
  const int64_t n = static_cast<int64_t>(terms.size());
  const at::ScalarType out_acc = p4d_out_acc_type(terms);
  const at::Tensor counts = p4d_counts(terms, kCpuOps);
  const int64_t* cnt = counts.data_ptr<int64_t>();

  std::vector<at::Tensor> grads(n);
  std::vector<int64_t> blk_begin(n + 1, 0);
  int64_t footprint = 0;
  for (int64_t i = 0; i < n; ++i) {
    const P4DTerm& T = terms[i];
    grads[i] = T.need_grad() ? empty_output(T.pred.sizes(), T.pred.options()) : at::empty({0}, T.pred.options());
    blk_begin[i + 1] = blk_begin[i] + (T.numel + kBlock - 1) / kBlock;
    footprint += T.numel * (T.pred.element_size() * (T.need_grad() ? 2 : 1) + T.target.element_size());
  }
  const bool stream = footprint >= kStreamFootprint;
  const int64_t nblocks = blk_begin[n];
  std::vector<double> partial(nblocks, 0.0);

  // Runs of kGrab blocks are claimed by whichever worker is free (an elastic loop,
  // cpu/parallel.h): on a loaded machine the caller never waits for a helper thread the
  // OS has not scheduled; it runs the blocks itself. Every block's sum has its own slot, so the
  // result does not depend on which worker ran it.
  constexpr int64_t kGrab = 4;
  const int64_t nruns = (nblocks + kGrab - 1) / kGrab;
  struct WorkerScratch {
    std::unique_ptr<Scratch<float>> f;
    std::unique_ptr<Scratch<double>> d;
  };
  std::vector<WorkerScratch> scratch(elastic_max_workers());
  elastic_for(nruns, static_cast<int>(scratch.size()), [&](int64_t run, int worker) {
    WorkerScratch& ws = scratch[worker];
    const int64_t b_begin = run * kGrab, b_end = std::min(nblocks, b_begin + kGrab);
    int64_t i = std::upper_bound(blk_begin.begin(), blk_begin.end(), b_begin) - blk_begin.begin() - 1;
    for (int64_t b = b_begin; b < b_end; ++b) {
      while (b >= blk_begin[i + 1]) ++i;
      const P4DTerm& T = terms[i];
      const int64_t e0 = (b - blk_begin[i]) * kBlock, len = std::min(kBlock, T.numel - e0);
      const at::Tensor& g = T.need_grad() ? grads[i] : at::Tensor();
      if (T.acc_double()) {
        if (!ws.d) ws.d.reset(new Scratch<double>());
        partial[b] = term_block<double>(T, g, e0, len, p4d_grad_scale<double>(T.grad_factor, cnt[i], mean),
                                        log_eps, *ws.d);
      } else {
        if (!ws.f) ws.f.reset(new Scratch<float>());
        partial[b] = term_block<float>(T, g, e0, len, p4d_grad_scale<float>(T.grad_factor, cnt[i], mean),
                                       static_cast<float>(log_eps), *ws.f, stream);
      }
    }
    stream_fence(stream);  // this worker's non-temporal stores are visible before the run counts as done
  });

  at::Tensor losses = at::empty({n}, counts.options().dtype(out_acc));
  double total = 0.0;
  std::vector<double> loss_values(n);
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int64_t b = blk_begin[i]; b < blk_begin[i + 1]; ++b) s += partial[b];  // block order
    double v = s;
    if (mean) v = cnt[i] > 0 ? s / static_cast<double>(cnt[i]) : 0.0;
    if (cnt[i] == 0) v = 0.0;
    loss_values[i] = v;
    total += terms[i].weight * v;
  }
  if (out_acc == at::kDouble) {
    for (int64_t i = 0; i < n; ++i) losses.data_ptr<double>()[i] = loss_values[i];
  } else {
    for (int64_t i = 0; i < n; ++i) losses.data_ptr<float>()[i] = static_cast<float>(loss_values[i]);
  }
  at::Tensor total_t = at::full({}, total, counts.options().dtype(out_acc));
  return {total_t, losses, grads};
}

// ---- fused Linear + latent loss: the elementwise part over a chunk of rows -----------------
void linear_rows_cpu(at::Tensor y, const at::Tensor& target, const at::Tensor& mask, const at::Tensor& row_scale,
                     const at::Tensor& scale, int kind, double beta, bool write_grad, at::Tensor row_loss) {
  const int64_t R = y.size(0), D = y.size(1);
  if (R == 0) return;
  TORCH_CHECK(y.is_contiguous() && target.is_contiguous() && row_loss.is_contiguous(),
              "p4d_linear_loss: internal: chunk tensors must be contiguous");
  double* out = row_loss.data_ptr<double>();
  const uint8_t* mp = mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  const at::Tensor rs_d = row_scale.defined() ? row_scale.to(at::kDouble).contiguous() : at::Tensor();
  const double* rsp = rs_d.defined() ? rs_d.data_ptr<double>() : nullptr;
  const double s0 = scale.item<double>();
  const bool dbl = y.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble;
  const size_t row_bytes = static_cast<size_t>(D) * y.element_size();
  char* ybytes = static_cast<char*>(y.data_ptr());
  // Each row is a maskless term of D elements; its gradient is written over y (a block reads
  // its inputs before writing them).
  P4DTerm T;
  T.kind = kind;
  T.beta = beta;
  T.numel = R * D;
  T.pred = y;
  T.target = target;
  const at::Tensor g = write_grad ? y : at::Tensor();
  const int64_t grain = std::max<int64_t>(1, kBlock / std::max<int64_t>(D, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    Scratch<float> sf;
    std::unique_ptr<Scratch<double>> sd;
    for (int64_t r = r0; r < r1; ++r) {
      if (mp && !mp[r]) {  // masked token: no loss, zero gradient
        out[r] = 0.0;
        if (write_grad) std::memset(ybytes + r * row_bytes, 0, row_bytes);
        continue;
      }
      const double rs = s0 * (rsp ? rsp[r] : 1.0);
      double acc = 0.0;
      for (int64_t d0 = 0; d0 < D; d0 += kBlock) {
        const int64_t len = std::min(kBlock, D - d0), e0 = r * D + d0;
        if (dbl) {
          if (!sd) sd.reset(new Scratch<double>());
          acc += term_block<double>(T, g, e0, len, rs, 0.0, *sd);
        } else {
          acc += term_block<float>(T, g, e0, len, static_cast<float>(rs), 0.0f, sf);
        }
      }
      out[r] = acc;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> p4d_linear_loss_cpu(
    const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& target,
    const c10::optional<at::Tensor>& mask, int64_t kind, double beta, int64_t reduction, int64_t chunk_size,
    bool need_h_grad, bool need_w_grad, bool need_b_grad) {
  const P4DLinearArgs a = p4d_linear_args(h, weight, bias, target, mask, kind, beta, chunk_size);
  return p4d_linear_forward_driver(a, reduction, need_h_grad, need_w_grad, need_b_grad, kCpuOps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> p4d_linear_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& mask, int64_t kind, double beta, int64_t chunk_size,
    bool need_h_grad, bool need_w_grad, bool need_b_grad) {
  const P4DLinearArgs a = p4d_linear_args(h, weight, bias, target, mask, kind, beta, chunk_size);
  return p4d_linear_backward_driver(a, grad_loss, need_h_grad, need_w_grad, need_b_grad, kCpuOps);
}

}  // namespace

// The ops' schemas are declared in rgpt4d/ops/p4d.py (rgpt4d/ops/registry.py); this file registers
// their CPU kernels.

TORCH_LIBRARY_IMPL(rgpt4d, CPU, m) {
  m.impl("p4d_loss", &p4d_loss_cpu);
  m.impl("p4d_linear_loss", &p4d_linear_loss_cpu);
  m.impl("p4d_linear_loss_backward", &p4d_linear_loss_backward_cpu);
}

}  // namespace rgpt4d
