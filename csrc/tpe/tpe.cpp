// TPE ops: the CPU kernels (schemas: rgpt4d/ops/tpe.py).
//
//   tpe_add(x[B,T,N,D], timestamps[B,T], table[L,D]?, base)           -> out[B,T,N,D]
//   tpe_add_(x!, ...)                                                  (in place)
//   tpe_table_backward(grad[B,T,N,D], timestamps[B,T], num_rows, det)  -> fp32 [num_rows, D]
//   tpe_ds_ln(x[B,T,h*w,D], ts, table?, weight?, bias?, h, w, window, eps, base)
//       -> (out[B,T,M,K], mean[B,T,M], rstd[B,T,M]; stats in fp32, fp64 for fp64 x),  M = ceil(h/win)*ceil(w/win), K = win^2*D
//   tpe_ds_ln_backward(grad_out, x, ts, table?, weight?, mean, rstd, h, w, window, base,
//                      need_input_grad, need_weight_grad, need_bias_grad)
//       -> (grad_x[B,T,h*w,D] or [0], grad_weight fp32 [K] or [0], grad_bias fp32 [K] or [0])
//
// Learned variant (table given): timestamps are integer rows of the table. Sinusoidal variant:
// timestamps are seconds and the encoding is computed in the kernel, one row per frame.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/runtime.h"
#include "tpe/tpe_common.h"
#include "tpe/tpe_cpu_loops.h"
#include "tpe/tpe_math.h"

namespace rgpt4d {
namespace {

// ---- row primitives: generic templates, with vectorised float / bf16 overloads ------------
template <typename S, typename A>
inline void add_row(const S* x, const A* e, S* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<S>(static_cast<A>(x[i]) + e[i]);
}
inline void add_row(const float* x, const float* e, float* y, int64_t n) { cpu::add_row_f32(x, e, y, n); }
inline void add_row(const c10::BFloat16* x, const float* e, c10::BFloat16* y, int64_t n) {
  cpu::add_row_bf16(reinterpret_cast<const uint16_t*>(x), e, reinterpret_cast<uint16_t*>(y), n);
}

// y = x + e written with streaming stores (cpu/stream.h). float: one fused loop; other
// types: pieces of one cache line, computed into a register-sized buffer and streamed at once
// (small pieces keep the reads of x and the writes of y overlapped).
template <typename S, typename A>
inline void add_row_stream(const S* x, const A* e, S* y, int64_t n) {
  constexpr int64_t kPiece = 64 / sizeof(S);
  S buf[kPiece];
  for (int64_t i = 0; i < n; i += kPiece) {
    const int64_t len = std::min(kPiece, n - i);
    add_row(x + i, e + i, buf, len);
    cpu::stream_copy(y + i, buf, len * static_cast<int64_t>(sizeof(S)));
  }
}
inline void add_row_stream(const float* x, const float* e, float* y, int64_t n) { cpu::add_row_f32_stream(x, e, y, n); }

template <typename S, typename A>
inline void acc_row(const S* x, A* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<A>(x[i]);
}
inline void acc_row(const float* x, float* acc, int64_t n) { cpu::acc_row_f32(x, acc, n); }
inline void acc_row(const c10::BFloat16* x, float* acc, int64_t n) {
  cpu::acc_row_bf16(reinterpret_cast<const uint16_t*>(x), acc, n);
}

template <typename S, typename A>
inline void gather_add(const S* x, const A* e, A* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<A>(x[i]) + e[i];
}
inline void gather_add(const float* x, const float* e, float* v, int64_t n) { cpu::gather_add_f32(x, e, v, n); }
inline void gather_add(const c10::BFloat16* x, const float* e, float* v, int64_t n) {
  cpu::gather_add_bf16(reinterpret_cast<const uint16_t*>(x), e, v, n);
}

using cpu::load_row;
using cpu::store_row;

template <typename A>
inline A row_sum(const A* v, int64_t n) {
  A s = 0;
  for (int64_t i = 0; i < n; ++i) s += v[i];
  return s;
}
inline float row_sum(const float* v, int64_t n) { return cpu::sum_f32(v, n); }

template <typename A>
inline A row_sumsq_centered(const A* v, A mean, int64_t n) {
  A s = 0;
  for (int64_t i = 0; i < n; ++i) s += (v[i] - mean) * (v[i] - mean);
  return s;
}
inline float row_sumsq_centered(const float* v, float mean, int64_t n) { return cpu::sumsq_centered_f32(v, mean, n); }

template <typename A>
inline A row_dot(const A* a, const A* b, int64_t n) {
  A s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
inline float row_dot(const float* a, const float* b, int64_t n) { return cpu::dot_f32(a, b, n); }

template <typename A>
inline void row_normalize(A* v, A mean, A rstd, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = (v[i] - mean) * rstd;
}
inline void row_normalize(float* v, float mean, float rstd, int64_t n) { cpu::normalize_f32(v, mean, rstd, n); }

template <typename A>
inline void row_affine(A* v, const A* w, const A* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = v[i] * (w ? w[i] : A(1)) + (b ? b[i] : A(0));
}
inline void row_affine(float* v, const float* w, const float* b, int64_t n) { cpu::affine_f32(v, w, b, n); }

template <typename A>
inline void row_mul(A* g, const A* w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] *= w[i];
}
inline void row_mul(float* g, const float* w, int64_t n) { cpu::mul_f32(g, w, n); }

template <typename A>
inline void row_ln_dx(A* gw, const A* xhat, A rstd, A c1, A c2, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gw[i] = rstd * (gw[i] - c1 - xhat[i] * c2);
}
inline void row_ln_dx(float* gw, const float* xhat, float rstd, float c1, float c2, int64_t n) {
  cpu::ln_dx_f32(gw, xhat, rstd, c1, c2, n);
}

template <typename A>
inline void row_wb_acc(const A* g, const A* xhat, A* aw, A* ab, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (aw) aw[i] += g[i] * xhat[i];
    if (ab) ab[i] += g[i];
  }
}
inline void row_wb_acc(const float* g, const float* xhat, float* aw, float* ab, int64_t n) {
  cpu::ln_wb_acc_f32(g, xhat, aw, ab, n);
}

// ---- the encoding of one frame ------------------------------------------------------------
// Fills enc[0..D) for frame bt: a table row (converted to the accumulation type) or the
// sinusoid of timestamps[bt] seconds.
template <typename A>
struct FrameEncoder {
  const A* table;        // [L, D] in A, or null for the sinusoidal variant
  const int64_t* rows;   // [BT] table rows (learned)
  const A* seconds;      // [BT] seconds (sinusoidal)
  int64_t D;
  A log_base;
  std::vector<A> inv_freq;  // [D] per channel (sinusoidal): computed once, not once per frame
  void operator()(int64_t bt, A* enc) const {
    if (table) {
      const A* src = table + rows[bt] * D;
      for (int64_t d = 0; d < D; ++d) enc[d] = src[d];
    } else {
      const A t = seconds[bt];
      // the same expression as tpe_value (tpe_math.h), with the frequency looked up
      for (int64_t d = 0; d < D; ++d) {
        const A a = t * inv_freq[d];
        enc[d] = (d & 1) ? std::cos(a) : std::sin(a);
      }
    }
  }
};

template <typename A>
FrameEncoder<A> make_encoder(const EncoderInputs& in, int64_t D, double base) {
  FrameEncoder<A> f;
  f.table = in.table.defined() ? in.table.data_ptr<A>() : nullptr;
  f.rows = in.rows.defined() ? in.rows.data_ptr<int64_t>() : nullptr;
  f.seconds = in.seconds.defined() ? in.seconds.data_ptr<A>() : nullptr;
  f.D = D;
  f.log_base = static_cast<A>(std::log(base));
  if (!f.table) {
    f.inv_freq.resize(D);
    for (int64_t d = 0; d < D; ++d) f.inv_freq[d] = tpe_inv_freq<A>(d, D, f.log_base);
  }
  return f;
}

// ---- tpe_add ------------------------------------------------------------------------------
void tpe_add_into(const at::Tensor& x, const at::Tensor& timestamps, const c10::optional<at::Tensor>& table,
                  double base, const at::Tensor& out) {
  const int64_t B = x.size(0), T = x.size(1), N = x.size(2), D = x.size(3);
  const int64_t BT = B * T;
  const at::ScalarType acc_dt = acc_type(x.scalar_type());
  EncoderInputs enc_in = prepare_encoder(timestamps, table, acc_dt, "tpe_add", /*check_range=*/true);
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tpe_add_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto encode = make_encoder<A>(enc_in, D, base);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // Chunks of about 64K elements (a few rows), claimed by whichever worker is free
    // (cpu/parallel.h). Each worker keeps the encoding of the frame it last used, so a
    // frame's encoding is computed about once per worker, not once per chunk.
    // A call that moves more than a last-level cache writes the output with streaming stores
    // (cpu/stream.h): no read for ownership of its lines, a third less memory traffic.
    // In place (out == x) there is nothing to save: the line was just read.
    const int64_t rows_total = BT * N;
    const int64_t rows_per_chunk = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(D, 1));
    const int64_t nchunks = (rows_total + rows_per_chunk - 1) / rows_per_chunk;
    const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
    const bool stream = op != xp && 2 * rows_total * row_bytes >= cpu::kStreamFootprint;
    struct WorkerEnc {
      std::vector<A> enc;
      int64_t cur = -1;
    };
    std::vector<WorkerEnc> wenc(elastic_max_workers());
    elastic_for(nchunks, static_cast<int>(wenc.size()), [&](int64_t c, int worker) {
      WorkerEnc& we = wenc[worker];
      if (we.enc.empty()) we.enc.resize(D);
      const int64_t r1 = std::min(rows_total, (c + 1) * rows_per_chunk);
      for (int64_t r = c * rows_per_chunk; r < r1; ++r) {
        const int64_t bt = r / N;
        if (bt != we.cur) {
          encode(bt, we.enc.data());
          we.cur = bt;
        }
        if (stream) {
          add_row_stream(xp + r * D, we.enc.data(), op + r * D, D);
        } else {
          add_row(xp + r * D, we.enc.data(), op + r * D, D);
        }
      }
      if (stream) cpu::stream_fence();
    });
  });
}

at::Tensor tpe_add_cpu(const at::Tensor& x, const at::Tensor& timestamps, const c10::optional<at::Tensor>& table,
                       double base) {
  check_tpe_shapes(x, timestamps, table, "tpe_add");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = empty_output(xc.sizes(), xc.options());
  tpe_add_into(xc, timestamps, table, base, out);
  return out;
}

void tpe_add_inplace_cpu(const at::Tensor& x, const at::Tensor& timestamps, const c10::optional<at::Tensor>& table,
                         double base) {
  check_tpe_shapes(x, timestamps, table, "tpe_add_");
  if (x.is_contiguous()) {
    tpe_add_into(x, timestamps, table, base, x);
  } else {
    at::Tensor xc = x.contiguous();
    tpe_add_into(xc, timestamps, table, base, xc);
    x.copy_(xc);
  }
}

// ---- table gradient: fp32 sum over N per frame, then an ordered scatter into table rows ----
at::Tensor tpe_table_backward_cpu(const at::Tensor& grad, const at::Tensor& timestamps, int64_t num_rows,
                                  bool deterministic) {
  (void)deterministic;  // the CPU path is always deterministic
  TORCH_CHECK(grad.dim() == 4, "tpe_table_backward: grad must be [B, T, N, D]");
  const int64_t B = grad.size(0), T = grad.size(1), N = grad.size(2), D = grad.size(3), BT = B * T;
  const at::ScalarType acc_dt = acc_type(grad.scalar_type());
  // The output from the CPU output cache (cpu/alloc.h): a fresh 2 MB [500, 1152] gradient
  // would page-fault and be zeroed by the kernel on every call (~10% of the call).
  at::Tensor out = empty_output({num_rows, D}, grad.options().dtype(acc_dt));
  if (BT == 0 || D == 0) return out.zero_();
  const at::Tensor g = grad.contiguous();
  const at::Tensor rows = timestamps.to(at::kLong).contiguous();
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < BT; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < num_rows, "tpe_table_backward: timestamps must index rows of table in [0, ",
                num_rows, "), got ", rp[i]);
  // Each task streams a fixed slice of one frame's rows (contiguous memory) into its own fp32
  // partial row; partials are then added in a fixed order. The slicing depends only on N, so
  // the result is bitwise the same for any thread count. One parallel region per call (an
  // elastic one, cpu/parallel.h): its first chunks zero the output, the rest are the
  // slices; on a shared machine every extra region can cost a wait for a descheduled thread.
  constexpr int64_t kRowsPerSlice = 128;
  const int64_t nslices = std::max<int64_t>(1, (N + kRowsPerSlice - 1) / kRowsPerSlice);
  const int64_t ntasks = BT * nslices;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "tpe_table_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    // The partial rows live in a buffer the calling thread keeps between calls (up to 16 MiB;
    // a fresh one per call page-faults like the output above).
    constexpr size_t kKeepBytes = size_t(16) << 20;
    static thread_local std::vector<A> kept;
    std::vector<A> fresh;
    std::vector<A>& partial = size_t(ntasks * D) * sizeof(A) <= kKeepBytes ? kept : fresh;
    if (partial.size() < size_t(ntasks * D)) partial.resize(size_t(ntasks * D));
    A* pp = partial.data();
    A* op = out.data_ptr<A>();
    const int64_t out_numel = num_rows * D;
    constexpr int64_t kZeroChunk = int64_t(1) << 16;  // elements of the output zeroed per chunk
    const int64_t nzero = (out_numel + kZeroChunk - 1) / kZeroChunk;
    elastic_for(nzero + ntasks, elastic_max_workers(), [&](int64_t c, int) {
      if (c < nzero) {
        const int64_t e0 = c * kZeroChunk;
        std::fill(op + e0, op + std::min(out_numel, e0 + kZeroChunk), A(0));
        return;
      }
      const int64_t task = c - nzero;
      const int64_t bt = task / nslices, n0 = (task % nslices) * kRowsPerSlice;
      const int64_t n1 = std::min(N, n0 + kRowsPerSlice);
      A* acc = pp + task * D;
      std::fill(acc, acc + D, A(0));
      // One row at a time: the slice is read as one sequential stream (the hardware prefetcher
      // follows it across pages), with acc in L1. Four rows per pass over acc (four streams a
      // row apart, each under a page long) ran 15-25% slower (benchmarks/bench_tpe.py).
      for (int64_t n = n0; n < n1; ++n) acc_row(gp + (bt * N + n) * D, acc, D);
    });
    // Ordered scatter, serial: BT * slices * D additions are negligible next to the N-fold larger
    // read above.
    for (int64_t task = 0; task < ntasks; ++task) {
      A* dst = op + rp[task / nslices] * D;
      const A* src = pp + task * D;
      for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
    }
  });
  return out;
}

// ---- fused TPE + window downsample + LayerNorm --------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> tpe_ds_ln_cpu(
    const at::Tensor& x, const at::Tensor& timestamps, const c10::optional<at::Tensor>& table,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, int64_t h, int64_t w,
    int64_t window, double eps, double base) {
  check_ds_ln_shapes(x, timestamps, table, weight, bias, h, w, window, "tpe_downsample_layernorm");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(3), BT = B * T;
  const DsGeom geo = make_ds_geom(h, w, window, D);
  const int64_t M = geo.M(), K = geo.K(), W2 = window * window;
  const at::Tensor xc = x.contiguous();
  at::Tensor out = empty_output({B, T, M, K}, x.options());
  const at::ScalarType acc_dt = acc_type(x.scalar_type());
  at::Tensor mean = at::empty({B, T, M}, x.options().dtype(acc_dt));
  at::Tensor rstd = at::empty({B, T, M}, x.options().dtype(acc_dt));
  EncoderInputs enc_in = prepare_encoder(timestamps, table, acc_dt, "tpe_downsample_layernorm", /*check_range=*/true);
  if (BT * M == 0 || K == 0) return {out, mean, rstd};
  const at::Tensor wt = (weight.has_value() && weight->defined()) ? weight->to(acc_dt).contiguous() : at::Tensor();
  const at::Tensor bs = (bias.has_value() && bias->defined()) ? bias->to(acc_dt).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tpe_ds_ln_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto encode = make_encoder<A>(enc_in, D, base);
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    A* mp = mean.data_ptr<A>();
    A* rp = rstd.data_ptr<A>();
    const A* wp = wt.defined() ? wt.data_ptr<A>() : nullptr;
    const A* bp = bs.defined() ? bs.data_ptr<A>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / K);
    at::parallel_for(0, BT * M, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> enc(D), v(K);
      int64_t cur = -1;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bt = r / M, o = r % M;
        if (bt != cur) {
          encode(bt, enc.data());
          cur = bt;
        }
        for (int64_t j = 0; j < W2; ++j) {
          const int64_t s = geo.source(o, j);
          A* vj = v.data() + j * D;
          if (s >= 0) {
            gather_add(xp + (bt * h * w + s) * D, enc.data(), vj, D);
          } else {
            std::fill(vj, vj + D, A(0));  // padding is added after the encoding
          }
        }
        const A mu = row_sum(v.data(), K) / static_cast<A>(K);
        const A var = row_sumsq_centered(v.data(), mu, K) / static_cast<A>(K);
        const A rs = A(1) / std::sqrt(var + static_cast<A>(eps));
        row_normalize(v.data(), mu, rs, K);
        row_affine(v.data(), wp, bp, K);
        store_row(v.data(), op + r * K, K);
        mp[r] = mu;
        rp[r] = rs;
      }
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tpe_ds_ln_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& timestamps,
    const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t h, int64_t w, int64_t window, double base, bool need_input_grad,
    bool need_weight_grad, bool need_bias_grad) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(3), BT = B * T;
  const DsGeom geo = make_ds_geom(h, w, window, D);
  const int64_t M = geo.M(), K = geo.K(), W2 = window * window;
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == B && grad_out.size(1) == T && grad_out.size(2) == M &&
                  grad_out.size(3) == K,
              "tpe_ds_ln_backward: grad_out must be [B, T, M, K]");
  const bool has_w = weight.has_value() && weight->defined();
  need_weight_grad = need_weight_grad && has_w;
  const at::ScalarType acc_dt = acc_type(x.scalar_type());
  at::Tensor grad_x = need_input_grad ? empty_output(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor grad_w = need_weight_grad ? at::zeros({K}, x.options().dtype(acc_dt)) : at::empty({0}, x.options().dtype(acc_dt));
  at::Tensor grad_b = need_bias_grad ? at::zeros({K}, x.options().dtype(acc_dt)) : at::empty({0}, x.options().dtype(acc_dt));
  const int64_t rows = BT * M;
  if (rows == 0 || K == 0 || !(need_input_grad || need_weight_grad || need_bias_grad)) return {grad_x, grad_w, grad_b};
  EncoderInputs enc_in = prepare_encoder(timestamps, table, acc_dt, "tpe_downsample_layernorm", /*check_range=*/true);
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const at::Tensor wt = has_w ? weight->to(acc_dt).contiguous() : at::Tensor();
  // Weight/bias partial sums per fixed block of rows, reduced in block order: the result does
  // not depend on the thread count.
  constexpr int64_t kRowsPerBlock = 64;
  const int64_t nblocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const bool wb = need_weight_grad || need_bias_grad;
  at::Tensor part_w = need_weight_grad ? at::zeros({nblocks, K}, x.options().dtype(acc_dt)) : at::Tensor();
  at::Tensor part_b = need_bias_grad ? at::zeros({nblocks, K}, x.options().dtype(acc_dt)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tpe_ds_ln_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto encode = make_encoder<A>(enc_in, D, base);
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const A* mp = mc.data_ptr<A>();
    const A* rp = rc.data_ptr<A>();
    const A* wp = has_w ? wt.data_ptr<A>() : nullptr;
    scalar_t* gxp = need_input_grad ? grad_x.data_ptr<scalar_t>() : nullptr;
    A* pw = need_weight_grad ? part_w.data_ptr<A>() : nullptr;
    A* pb = need_bias_grad ? part_b.data_ptr<A>() : nullptr;
    at::parallel_for(0, nblocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
      std::vector<A> enc(D), xhat(K), g(K);
      int64_t cur = -1;
      for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
        const int64_t r_end = std::min(rows, (blk + 1) * kRowsPerBlock);
        for (int64_t r = blk * kRowsPerBlock; r < r_end; ++r) {
          const int64_t bt = r / M, o = r % M;
          if (bt != cur) {
            encode(bt, enc.data());
            cur = bt;
          }
          for (int64_t j = 0; j < W2; ++j) {
            const int64_t s = geo.source(o, j);
            A* vj = xhat.data() + j * D;
            if (s >= 0) {
              gather_add(xp + (bt * h * w + s) * D, enc.data(), vj, D);
            } else {
              std::fill(vj, vj + D, A(0));
            }
          }
          const A mu = mp[r], rs = rp[r];
          row_normalize(xhat.data(), mu, rs, K);
          load_row(gp + r * K, g.data(), K);
          if (wb) row_wb_acc(g.data(), xhat.data(), pw ? pw + blk * K : nullptr, pb ? pb + blk * K : nullptr, K);
          if (!need_input_grad) continue;
          if (wp) row_mul(g.data(), wp, K);  // g <- g * weight
          const A c1 = row_sum(g.data(), K) / static_cast<A>(K);
          const A c2 = row_dot(g.data(), xhat.data(), K) / static_cast<A>(K);
          row_ln_dx(g.data(), xhat.data(), rs, c1, c2, K);
          for (int64_t j = 0; j < W2; ++j) {
            const int64_t s = geo.source(o, j);
            if (s >= 0) store_row(g.data() + j * D, gxp + (bt * h * w + s) * D, D);
          }
        }
      }
    });
  });
  if (need_weight_grad) grad_w = part_w.sum(0);
  if (need_bias_grad) grad_b = part_b.sum(0);
  return {grad_x, grad_w, grad_b};
}

}  // namespace

// The ops' schemas are declared in rgpt4d/ops/tpe.py (rgpt4d/ops/registry.py); this file registers
// their CPU kernels.

TORCH_LIBRARY_IMPL(rgpt4d, CPU, m) {
  m.impl("tpe_add", &tpe_add_cpu);
  m.impl("tpe_add_", &tpe_add_inplace_cpu);
  m.impl("tpe_table_backward", &tpe_table_backward_cpu);
  m.impl("tpe_ds_ln", &tpe_ds_ln_cpu);
  m.impl("tpe_ds_ln_backward", &tpe_ds_ln_backward_cpu);
}

}  // namespace rgpt4d
