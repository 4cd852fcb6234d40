// Attention for short sequences: the CPU kernels (schemas: rgpt4d/ops/attn.py).
//
//   attention(q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], mask?, scale, causal)
//       -> (out [B, Lq, Hq, Dv] (q's dtype, contiguous), lse [B, Hq, Lq] (float32; float64 for float64))
//     softmax(scale * q k^T + mask) v, head h reading key/value head h / (Hq / Hkv) (grouped-query
//     attention, as torch's enable_gqa). causal: query i sees keys j <= i (top-left aligned, as
//     SDPA's is_causal). mask: bool (true = attend) or additive (any float dtype), broadcastable to
//     [B, Hq, Lq, Lk]. A query that sees no key gets 0 (and lse = +inf), as SDPA's math path.
//     The output is laid out [B, Lq, Hq, Dv]: the layout a transformer's o_proj reads, so the
//     caller's transpose(1, 2).reshape(B, Lq, Hq*Dv) is free.
//
//   attention_backward(grad_out [B, Lq, Hq, Dv], q, k, v, mask?, out, lse, scale, causal,
//                      need_q, need_kv) -> (grad_q, grad_k, grad_v) (empty [0] when not needed)
//
// The kernel (flash-attention's recomputation, on CPU panels). Every (b, key/value head)'s keys
// are packed once, transposed and padded; a forward task takes 32 query rows of one head, packs
// them (pre-scaled), computes the scores with one register-tiled GEMM (attn_cpu_loops.h), the
// softmax row by row (only the log-sum-exp is kept for backward) and P V with a second GEMM.
// The backward recomputes P from lse. One task per (b, key/value head) owns every gradient row
// of that head and of the query heads that read it: for each query chunk of 64 and key block of
// 64, five GEMMs in the transposed orientation (S^T = K Q^T, dP^T = V dO^T, dV += P^T dO,
// dK += dS^T Q, dQ += dS K with dS = P o (dP - rowsum(dO o O))). No atomics: bitwise
// deterministic, independent of the thread count (at::parallel_for over whole tasks). Everything
// a task touches (its heads' keys and values, a block of scores) is O(L * D): meant for the
// sequences of a video MLLM's vision tower and a short prompt (up to a few thousand tokens), not
// long context.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/acc.h"
#include "attn/attn_cpu_loops.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // see attn_cpu_loops.h (emitted at the end of this file)
#endif

namespace rgpt4d {
namespace {

using cpu::attn_round_up;
using cpu::kAttnTileM;
using cpu::kAttnTileN;

constexpr int64_t kBlockM = 32;  // query rows of a forward task
constexpr int64_t kBlockN = 64;  // keys per block inside a backward task
constexpr int64_t kChunkQ = 64;  // query rows per chunk inside a backward task

template <typename T>
struct View {  // a [B, H, L, D] tensor with unit stride on its last dimension
  const T* p;
  int64_t sb, sh, sl;
  const T* row(int64_t b, int64_t h, int64_t l) const { return p + b * sb + h * sh + l * sl; }
};

template <typename T>
View<T> view_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

struct MaskView {
  int kind = 0;  // 0 none, 1 bool (true = attend), 2 additive (accumulation dtype)
  const void* p = nullptr;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
  int64_t offset(int64_t b, int64_t h, int64_t i, int64_t j) const { return b * sb + h * sh + i * sq + j * sk; }
};

// s[c] for c in [0, n): the scores at mask offsets off + c * step.
template <typename A>
void mask_line(A* s, int64_t n, const MaskView& mk, int64_t off, int64_t step) {
  if (mk.kind == 1) {
    const uint8_t* m = static_cast<const uint8_t*>(mk.p) + off;
    for (int64_t c = 0; c < n; ++c)
      if (!m[c * step]) s[c] = -std::numeric_limits<A>::infinity();
  } else if (mk.kind == 2) {
    const A* m = static_cast<const A*>(mk.p) + off;
    for (int64_t c = 0; c < n; ++c) s[c] += m[c * step];
  }
}

// A per-thread bump allocator over one growing buffer (reset per task).
template <typename A>
struct Scratch {
  std::vector<A> buf;
  size_t used = 0;
  void reset(size_t need) {
    if (buf.size() < need) buf.assign(need, A(0));
    used = 0;
  }
  A* take(size_t n) {
    A* p = buf.data() + used;
    used += n;
    return p;
  }
};

template <typename A>
Scratch<A>& scratch() {
  static thread_local Scratch<A> s;
  return s;
}

template <typename T, typename A>
struct Args {
  View<T> q, k, v;
  MaskView mask;
  int64_t B, Hq, Hkv, group, Lq, Lk, D, Dv;
  A scale;
  bool causal;
};

// rows [r0, r0 + m) of head (b, h) of x, times `mul`, into dst [mp x ld] (zero padding)
template <typename T, typename A>
void pack_rows(A* dst, int64_t ld, const View<T>& x, int64_t b, int64_t h, int64_t r0, int64_t m, int64_t mp,
               int64_t width, A mul) {
  for (int64_t r = 0; r < mp; ++r) {
    A* d = dst + r * ld;
    if (r < m) {
      const T* s = x.row(b, h, r0 + r);
      for (int64_t c = 0; c < width; ++c) d[c] = static_cast<A>(s[c]) * mul;
      for (int64_t c = width; c < ld; ++c) d[c] = A(0);
    } else {
      for (int64_t c = 0; c < ld; ++c) d[c] = A(0);
    }
  }
}

// the same rows transposed: dst [width x np], dst[c * np + r] (zero padding for r >= m)
template <typename T, typename A>
void pack_cols(A* dst, int64_t np, const View<T>& x, int64_t b, int64_t h, int64_t r0, int64_t m, int64_t width,
               A mul) {
  for (int64_t c = 0; c < width; ++c)
    for (int64_t r = m; r < np; ++r) dst[c * np + r] = A(0);
  for (int64_t r = 0; r < m; ++r) {
    const T* s = x.row(b, h, r0 + r);
    for (int64_t c = 0; c < width; ++c) dst[c * np + r] = static_cast<A>(s[c]) * mul;
  }
}

// Scores of query rows [i0, i0 + m) of head h against keys [0, jn), masked, in S [mp x np]:
// valid entries scale * q.k (+ mask), everything else -inf. kt: the head's keys, transposed
// [D x ldk] (ldk >= np: a causal block reads the first np columns).
template <typename T, typename A>
void scores_rows(const Args<T, A>& a, int64_t b, int64_t h, int64_t i0, int64_t m, int64_t mp, int64_t jn, int64_t np,
                 A* qp, const A* kt, int64_t ldk, A* s) {
  pack_rows(qp, a.D, a.q, b, h, i0, m, mp, a.D, a.scale);
  cpu::attn_gemm(qp, a.D, kt, ldk, s, np, mp, np, a.D, false);
  for (int64_t r = 0; r < m; ++r) {
    const int64_t i = i0 + r;
    const int64_t nv = a.causal ? std::min(jn, i + 1) : jn;
    A* row = s + r * np;
    if (a.mask.kind) mask_line(row, nv, a.mask, a.mask.offset(b, h, i, 0), a.mask.sk);
    for (int64_t j = nv; j < np; ++j) row[j] = -std::numeric_limits<A>::infinity();
  }
}

// kt [D x np] (keys transposed) and vp [Lk x dvp] (values, rows padded) of every (b, key/value head)
template <typename A>
struct Packed {
  const A* kt;
  const A* vp;
  int64_t np, dvp;
};

template <typename T, typename A>
void forward_task(const Args<T, A>& a, const Packed<A>& pk, int64_t b, int64_t h, int64_t i0, T* out, A* lse) {
  const int64_t i1 = std::min(i0 + kBlockM, a.Lq), m = i1 - i0, mp = attn_round_up(m, kAttnTileM);
  const int64_t jn = a.causal ? std::min(a.Lk, i1) : a.Lk;
  const int64_t np = attn_round_up(std::max<int64_t>(jn, 1), kAttnTileN), dvp = pk.dvp;
  const int64_t hk = h / a.group;
  Scratch<A>& ws = scratch<A>();
  ws.reset(mp * a.D + mp * np + mp * dvp + mp);
  A* qp = ws.take(mp * a.D);
  A* s = ws.take(mp * np);
  A* op = ws.take(mp * dvp);
  A* inv = ws.take(mp);
  A* lrow = lse + (b * a.Hq + h) * a.Lq;
  const A inf = std::numeric_limits<A>::infinity();
  if (jn > 0) {
    scores_rows(a, b, h, i0, m, mp, jn, np, qp, pk.kt + (b * a.Hkv + hk) * a.D * pk.np, pk.np, s);
    for (int64_t r = 0; r < mp; ++r) {
      A* row = s + r * np;
      const A mx = r < m ? cpu::attn_row_max(row, np) : -inf;
      if (mx == -inf) {  // sees no key (or a padding row): P = 0, out = 0
        std::fill(row, row + np, A(0));
        inv[r] = A(0);
        if (r < m) lrow[i0 + r] = inf;
      } else {
        const A l = cpu::attn_row_exp_sum(row, np, mx);
        inv[r] = A(1) / l;
        lrow[i0 + r] = mx + std::log(l);
      }
    }
    const A* vp = pk.vp + (b * a.Hkv + hk) * a.Lk * dvp;
    cpu::attn_gemm(s, np, vp, dvp, op, dvp, mp, dvp, jn, false);
  } else {
    std::fill(op, op + mp * dvp, A(0));
    std::fill(inv, inv + mp, A(0));
    for (int64_t r = 0; r < m; ++r) lrow[i0 + r] = inf;
  }
  for (int64_t r = 0; r < m; ++r) {
    T* o = out + ((b * a.Lq + i0 + r) * a.Hq + h) * a.Dv;
    const A* src = op + r * dvp;
    for (int64_t c = 0; c < a.Dv; ++c) o[c] = static_cast<T>(src[c] * inv[r]);
  }
}

template <typename T, typename A>
struct BackwardArgs {
  View<T> dout;    // [B, Lq, Hq, Dv] viewed as (b, h, l): row(b, h, i)
  const A* lse;    // [B, Hq, Lq]
  const A* delta;  // [B, Hq, Lq]: rowsum(dO o O)
};

// All gradients of key/value head hk of batch b: dK, dV of its keys and dQ of the queries of the
// `group` heads that read it. Loops: heads, query chunks of 64, key blocks of 64; per (chunk, block)
// five GEMMs in the transposed orientation (S^T = K Q^T, dP^T = V dO^T, dV += P^T dO,
// dK += dS^T Q, dQ += dS K). The task owns every row it writes.
template <typename T, typename A>
void backward_task(const Args<T, A>& a, const BackwardArgs<T, A>& g, int64_t b, int64_t hk, bool need_q, bool need_kv,
                   T* dq, const View<T>& dqv, T* dk, const View<T>& dkv, T* dv, const View<T>& dvv) {
  const int64_t Lk = a.Lk, D = a.D, Dv = a.Dv;
  const int64_t dp16 = attn_round_up(D, kAttnTileN), dvp16 = attn_round_up(Dv, kAttnTileN);
  const int64_t lk16 = attn_round_up(std::max<int64_t>(Lk, 1), kAttnTileN);
  const int64_t cq = attn_round_up(std::min(kChunkQ, std::max<int64_t>(a.Lq, 1)), kAttnTileN);
  const int64_t bn16 = attn_round_up(kBlockN, kAttnTileN);
  Scratch<A>& ws = scratch<A>();
  ws.reset(lk16 * dp16 + lk16 * dvp16 + (need_kv ? lk16 * (dp16 + dvp16) : 0) + D * cq + cq * dp16 + Dv * cq +
           cq * dvp16 + 2 * bn16 * cq + cq * bn16 + cq * dp16 + 2 * cq);
  A* kr = ws.take(lk16 * dp16);   // keys, rows padded to dp16 (zero rows up to lk16)
  A* vr = ws.take(lk16 * dvp16);  // values
  A* dka = need_kv ? ws.take(lk16 * dp16) : nullptr;
  A* dva = need_kv ? ws.take(lk16 * dvp16) : nullptr;
  A* qt = ws.take(D * cq);
  A* qr = ws.take(cq * dp16);
  A* dot = ws.take(Dv * cq);
  A* dor = ws.take(cq * dvp16);
  A* st = ws.take(bn16 * cq);
  A* dpt = ws.take(bn16 * cq);
  A* ds = ws.take(cq * bn16);
  A* dqc = ws.take(cq * dp16);
  A* lse_c = ws.take(cq);
  A* delta_c = ws.take(cq);
  pack_rows(kr, dp16, a.k, b, hk, 0, Lk, lk16, D, A(1));
  pack_rows(vr, dvp16, a.v, b, hk, 0, Lk, lk16, Dv, A(1));
  if (need_kv) {
    std::fill(dka, dka + lk16 * dp16, A(0));
    std::fill(dva, dva + lk16 * dvp16, A(0));
  }
  const A inf = std::numeric_limits<A>::infinity();
  for (int64_t h = hk * a.group; h < (hk + 1) * a.group; ++h) {
    const A* lrow = g.lse + (b * a.Hq + h) * a.Lq;
    const A* drow = g.delta + (b * a.Hq + h) * a.Lq;
    for (int64_t i0 = 0; i0 < a.Lq; i0 += kChunkQ) {
      const int64_t m = std::min(kChunkQ, a.Lq - i0), mp = attn_round_up(m, kAttnTileN);
      // keys this chunk sees: all, or (causal) j <= i0 + m - 1
      const int64_t jend = a.causal ? std::min(Lk, i0 + m) : Lk;
      if (need_q) std::fill(dqc, dqc + mp * dp16, A(0));
      if (jend > 0) {
        pack_cols(qt, mp, a.q, b, h, i0, m, D, a.scale);
        pack_rows(qr, dp16, a.q, b, h, i0, m, m, D, a.scale);
        pack_cols(dot, mp, g.dout, b, h, i0, m, Dv, A(1));
        pack_rows(dor, dvp16, g.dout, b, h, i0, m, m, Dv, A(1));
        for (int64_t c = 0; c < mp; ++c) {
          lse_c[c] = c < m ? lrow[i0 + c] : inf;
          delta_c[c] = c < m ? drow[i0 + c] : A(0);
        }
      }
      for (int64_t j0 = 0; j0 < jend; j0 += kBlockN) {
        const int64_t n = std::min(kBlockN, jend - j0), n4 = attn_round_up(n, kAttnTileM);
        const int64_t n16 = attn_round_up(n, kAttnTileN);
        cpu::attn_gemm(kr + j0 * dp16, dp16, qt, mp, st, mp, n4, mp, D, false);  // S^T
        for (int64_t t = 0; t < n4; ++t) {
          A* row = st + t * mp;
          if (t >= n) {
            std::fill(row, row + mp, A(0));
            continue;
          }
          const int64_t j = j0 + t;
          if (a.mask.kind) mask_line(row, m, a.mask, a.mask.offset(b, h, i0, j), a.mask.sq);
          if (a.causal)  // queries i < j do not see key j
            for (int64_t c = 0, e = std::min(m, j - i0); c < e; ++c) row[c] = -inf;
          cpu::attn_row_exp_cols(row, lse_c, mp);  // P^T
        }
        cpu::attn_gemm(vr + j0 * dvp16, dvp16, dot, mp, dpt, mp, n4, mp, Dv, false);  // dP^T = V dO^T
        if (need_kv) cpu::attn_gemm(st, mp, dor, dvp16, dva + j0 * dvp16, dvp16, n4, dvp16, m, true);  // dV += P^T dO
        for (int64_t t = 0; t < n; ++t) cpu::attn_row_ds_cols(st + t * mp, dpt + t * mp, delta_c, mp);  // dS^T
        if (need_kv) cpu::attn_gemm(st, mp, qr, dp16, dka + j0 * dp16, dp16, n4, dp16, m, true);  // dK += dS^T Q
        if (need_q) {
          for (int64_t c = 0; c < mp; ++c) {  // dS = (dS^T)^T, [mp x n16]
            A* d = ds + c * n16;
            for (int64_t t = 0; t < n; ++t) d[t] = st[t * mp + c];
            for (int64_t t = n; t < n16; ++t) d[t] = A(0);
          }
          cpu::attn_gemm(ds, n16, kr + j0 * dp16, dp16, dqc, dp16, mp, dp16, n, true);  // dQ += dS K
        }
      }
      if (need_q)
        for (int64_t r = 0; r < m; ++r) {
          T* d = dq + (dqv.row(b, h, i0 + r) - dqv.p);
          const A* src = dqc + r * dp16;
          for (int64_t c = 0; c < D; ++c) d[c] = static_cast<T>(src[c] * a.scale);
        }
    }
  }
  if (need_kv)
    for (int64_t t = 0; t < Lk; ++t) {
      T* d = dk + (dkv.row(b, hk, t) - dkv.p);
      T* e = dv + (dvv.row(b, hk, t) - dvv.p);
      for (int64_t c = 0; c < D; ++c) d[c] = static_cast<T>(dka[t * dp16 + c]);
      for (int64_t c = 0; c < Dv; ++c) e[c] = static_cast<T>(dva[t * dvp16 + c]);
    }
}

// ---- bindings --------------------------------------------------------------------------------

at::Tensor unit_last(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "attention: q, k, v must be 4-D [B, H, L, D], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention: q, k, v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "attention: q must be floating point, got ", q.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "attention: batch sizes differ: q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0 && v.size(1) == k.size(1),
              "attention: q's heads must be a multiple of k's and v's (equal): q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(k.size(2) == v.size(2), "attention: k and v must have the same length, got ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), "attention: q and k must have the same head size, got ", q.sizes(), ", ",
              k.sizes());
}

template <typename A>
MaskView mask_view(const c10::optional<at::Tensor>& mask, const at::Tensor& q, const at::Tensor& k,
                   at::Tensor& holder) {
  MaskView mv;
  if (!mask.has_value() || !mask->defined()) return mv;
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2);
  TORCH_CHECK(mask->dim() <= 4, "attention: mask must broadcast to [B, Hq, Lq, Lk] = [", B, ", ", H, ", ", Lq, ", ",
              Lk, "], got ", mask->sizes());
  TORCH_CHECK(mask->scalar_type() == at::kBool || at::isFloatingType(mask->scalar_type()),
              "attention: mask must be bool or floating point, got ", mask->scalar_type());
  at::Tensor m = mask->scalar_type() == at::kBool ? *mask : mask->to(acc_type(q.scalar_type()));
  holder = m.expand({B, H, Lq, Lk});  // raises when the shapes do not broadcast
  mv.kind = m.scalar_type() == at::kBool ? 1 : 2;
  mv.p = holder.data_ptr();
  mv.sb = holder.stride(0);
  mv.sh = holder.stride(1);
  mv.sq = holder.stride(2);
  mv.sk = holder.stride(3);
  return mv;
}

template <typename T, typename A>
Args<T, A> make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const MaskView& mv, double scale,
                     bool causal) {
  Args<T, A> a{view_of<T>(q), view_of<T>(k), view_of<T>(v), mv, q.size(0), q.size(1), k.size(1),
               q.size(1) / k.size(1), q.size(2), k.size(2), q.size(3), v.size(3), static_cast<A>(scale), causal};
  return a;
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, const c10::optional<at::Tensor>& mask,
                                                 double scale, bool causal) {
  check_qkv(q_in, k_in, v_in);
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), Dv = v.size(3);
  at::Tensor out = at::empty({B, Lq, Hq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(acc_type(q.scalar_type())));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  at::Tensor holder;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_cpu", [&] {
    using A = acc_t<scalar_t>;
    const MaskView mv = mask_view<A>(mask, q, k, holder);
    const Args<scalar_t, A> a = make_args<scalar_t, A>(q, k, v, mv, scale, causal);
    scalar_t* o = out.data_ptr<scalar_t>();
    A* l = lse.data_ptr<A>();
    const int64_t Hkv = k.size(1), Lk = k.size(2), D = q.size(3);
    const int64_t np = attn_round_up(std::max<int64_t>(Lk, 1), kAttnTileN), dvp = attn_round_up(Dv, kAttnTileN);
    // every (b, key/value head)'s keys transposed and values padded, once (shared by its query blocks)
    // uninitialised: the packing writes every element, padding included
    std::unique_ptr<A[]> kt(new A[B * Hkv * D * np]), vp(new A[B * Hkv * std::max<int64_t>(Lk, 1) * dvp]);
    at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        pack_cols(kt.get() + t * D * np, np, a.k, t / Hkv, t % Hkv, 0, Lk, D, A(1));
        pack_rows(vp.get() + t * Lk * dvp, dvp, a.v, t / Hkv, t % Hkv, 0, Lk, Lk, Dv, A(1));
      }
    });
    const Packed<A> pk{kt.get(), vp.get(), np, dvp};
    const int64_t nb = (Lq + kBlockM - 1) / kBlockM;
    // at::parallel_for hands each thread a contiguous range of tasks: ordered by head, so the
    // ranges hold whole heads (equal work under causal masking when the heads divide evenly)
    at::parallel_for(0, B * Hq * nb, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t blk = t % nb, bh = t / nb;
        forward_task<scalar_t, A>(a, pk, bh / Hq, bh % Hq, blk * kBlockM, o, l);
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, double scale, bool causal,
    bool need_q, bool need_kv) {
  check_qkv(q_in, k_in, v_in);
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), Lq = q.size(2), Dv = v.size(3);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.dim() == 4 && out.size(0) == B && out.size(1) == Lq &&
                  out.size(2) == Hq && out.size(3) == Dv,
              "attention_backward: grad_out and out must be [B, Lq, Hq, Dv] = [", B, ", ", Lq, ", ", Hq, ", ", Dv,
              "], got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == Hq && lse.size(2) == Lq &&
                  lse.scalar_type() == acc_type(q.scalar_type()),
              "attention_backward: lse must be [B, Hq, Lq] in the accumulation dtype, got ", lse.sizes(), " ",
              lse.scalar_type());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "attention_backward: grad_out and out must have q's dtype");
  at::Tensor dq = need_q ? at::empty_like(q) : at::empty({0}, q.options());
  at::Tensor dk = need_kv ? at::empty_like(k) : at::empty({0}, k.options());
  at::Tensor dv = need_kv ? at::empty_like(v) : at::empty({0}, v.options());
  if (!need_q && !need_kv) return {dq, dk, dv};
  // grad_out as a (b, h, i) view of its [B, Lq, Hq, Dv] layout
  const at::Tensor go = unit_last(grad_out);
  const at::Tensor oc = out.contiguous();
  const at::Tensor lc = lse.contiguous();
  at::Tensor delta = at::empty({B, Hq, Lq}, lse.options());
  at::Tensor holder;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const MaskView mv = mask_view<A>(mask, q, k, holder);
    const Args<scalar_t, A> a = make_args<scalar_t, A>(q, k, v, mv, scale, causal);
    const View<scalar_t> gov{go.data_ptr<scalar_t>(), go.stride(0), go.stride(2), go.stride(1)};
    const View<scalar_t> ov{oc.data_ptr<scalar_t>(), oc.stride(0), oc.stride(2), oc.stride(1)};
    A* dl = delta.data_ptr<A>();
    at::parallel_for(0, B * Hq * Lq, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = r % Lq, h = (r / Lq) % Hq, b = r / (Lq * Hq);
        const scalar_t* x = gov.row(b, h, i);
        const scalar_t* y = ov.row(b, h, i);
        A s = 0;
        for (int64_t c = 0; c < Dv; ++c) s += static_cast<A>(x[c]) * static_cast<A>(y[c]);
        dl[r] = s;
      }
    });
    const BackwardArgs<scalar_t, A> g{gov, lc.data_ptr<A>(), dl};
    scalar_t* dqp = need_q ? dq.data_ptr<scalar_t>() : nullptr;
    scalar_t* dkp = need_kv ? dk.data_ptr<scalar_t>() : nullptr;
    scalar_t* dvp = need_kv ? dv.data_ptr<scalar_t>() : nullptr;
    const View<scalar_t> dqv = need_q ? view_of<scalar_t>(dq) : View<scalar_t>{nullptr, 0, 0, 0};
    const View<scalar_t> dkv = need_kv ? view_of<scalar_t>(dk) : View<scalar_t>{nullptr, 0, 0, 0};
    const View<scalar_t> dvv = need_kv ? view_of<scalar_t>(dv) : View<scalar_t>{nullptr, 0, 0, 0};
    at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        backward_task<scalar_t, A>(a, g, t / Hkv, t % Hkv, need_q, need_kv, dqp, dqv, dkp, dkv, dvp, dvv);
    });
  });
  return {dq, dk, dv};
}

}  // namespace

// The ops' schemas are declared in rgpt4d/ops/attn.py (rgpt4d/ops/registry.py); this file registers
// their CPU kernels.

TORCH_LIBRARY_IMPL(rgpt4d, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace rgpt4d
