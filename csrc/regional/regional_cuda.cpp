// CUDA bindings of the regional ops: tensors -> raw pointers -> the launchers in
// regional_cuda_kernels.cu. Checks mirror the CPU ones (regional_common.h). Value checks that need
// a device sync (batch-index range, table rows) are left to the Python layer; the kernels skip RoIs
// whose image index is out of range, so they stay memory-safe without them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "common/cuda_bind.h"
#include "regional/regional_common.h"
#include "regional/regional_cuda.h"
#include "tpe/tpe_common.h"

namespace rgpt4d {
namespace {

cuda::EncArgs no_encoding() {
  cuda::EncArgs a{};
  a.D = 0;
  return a;
}

cuda::EncArgs encoding(const c10::optional<at::Tensor>& timestamps, const c10::optional<at::Tensor>& table, int64_t C,
                       double base, at::ScalarType acc, const char* op, EncoderInputs& keep) {
  if (!(timestamps.has_value() && timestamps->defined())) return no_encoding();
  keep = prepare_encoder(*timestamps, table, acc, op, /*check_range=*/false);
  cuda::EncArgs a;
  a.table_acc = keep.table.defined() ? keep.table.data_ptr() : nullptr;
  a.rows = keep.rows.defined() ? keep.rows.data_ptr<int64_t>() : nullptr;
  a.seconds_acc = keep.seconds.defined() ? keep.seconds.data_ptr() : nullptr;
  a.D = C;
  a.log_base = std::log(base);
  return a;
}

// Image and layout of a [..., C, H, W] tensor whose leading dims (one or two) index images.
cuda::PoolArgs pool_args(const at::Tensor& t, int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned,
                         double spatial_scale) {
  const int64_t d = t.dim();
  cuda::PoolArgs pa;
  pa.C = t.size(d - 3);
  pa.H = t.size(d - 2);
  pa.W = t.size(d - 1);
  pa.ph = ph;
  pa.pw = pw;
  pa.sampling_ratio = sampling_ratio;
  pa.aligned = aligned;
  pa.spatial_scale = spatial_scale;
  pa.images = d == 5 ? t.size(0) * t.size(1) : t.size(0);
  pa.img_inner = d == 5 ? std::max<int64_t>(t.size(1), 1) : 1;
  pa.s_outer = t.stride(0);
  pa.s_inner = d == 5 ? t.stride(1) : 0;
  pa.sC = t.stride(d - 3);
  pa.sH = t.stride(d - 2);
  pa.sW = t.stride(d - 1);
  return pa;
}

// A [..., C, H, W] gradient buffer: contiguous, or channels-last.
at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& opt, bool channels_last) {
  if (!channels_last) return at::zeros(sizes, opt);
  const int64_t d = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> cl(sizes.begin(), sizes.end() - 3), back;
  cl.push_back(sizes[d - 2]);
  cl.push_back(sizes[d - 1]);
  cl.push_back(sizes[d - 3]);
  for (int64_t i = 0; i < d - 3; ++i) back.push_back(i);
  back.push_back(d - 1);
  back.push_back(d - 3);
  back.push_back(d - 2);
  return at::zeros(cl, opt).permute(back);
}

// Image of each RoI from rois[:, 0] (truncated toward zero); -1 when outside [0, N).
at::Tensor roi_images(const at::Tensor& rois, int64_t N, at::ScalarType acc) {
  const at::Tensor idx = rois.select(1, 0).to(acc);
  const at::Tensor ok = idx.gt(-1.0).logical_and(idx.lt(static_cast<double>(N)));
  return at::where(ok, idx.nan_to_num(0.0).trunc(), at::full_like(idx, -1.0)).to(at::kLong).contiguous();
}

at::Tensor region_images(const at::Tensor& boxes, const c10::optional<at::Tensor>& valid) {
  const int64_t B = boxes.size(0), T = boxes.size(1), R = boxes.size(2);
  at::Tensor img = at::arange(B * T, boxes.options().dtype(at::kLong)).repeat_interleave(R);
  if (valid.has_value() && valid->defined()) img = at::where(valid->reshape({-1}), img, at::full_like(img, -1));
  return img.contiguous();
}

at::Tensor pool_forward(const at::Tensor& feat, const at::Tensor& boxes_acc, const at::Tensor& roi_img,
                        const cuda::EncArgs& enc, const cuda::PoolArgs& pa, at::Tensor out, const char* op) {
  const int64_t K = boxes_acc.size(0);
  check_cuda(cuda::roi_pool_fwd_launch(to_dtype(feat.scalar_type()), feat.data_ptr(), boxes_acc.data_ptr(),
                                       roi_img.data_ptr<int64_t>(), enc, K, pa, out.data_ptr(),
                                       c10::cuda::getCurrentCUDAStream()),
             op);
  return out;
}

// Entries per pass of the deterministic backward: 2^24 taps (about 0.5 GB of keys, rows, weights and
// sort buffers); longer lists run in several passes that add to the earlier passes' sums.
constexpr int64_t kMaxEntries = int64_t(1) << 24;

// The deterministic RoI backward into buf (layout pa): entries (regional_math.h), a stable sort by
// target pixel, then one thread per gradient element sums its pixel's entries in that order.
void deterministic_backward(const at::Tensor& g, const at::Tensor& boxes_acc, const at::Tensor& roi_img,
                            const cuda::PoolArgs& pa, at::Tensor& buf, const char* op) {
  const int64_t K = boxes_acc.size(0), P = pa.ph * pa.pw;
  const bool fp64 = boxes_acc.scalar_type() == at::kDouble;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorOptions lopt = roi_img.options().dtype(at::kLong);
  at::Tensor counts = at::empty({K}, lopt);
  check_cuda(cuda::roi_sample_counts_launch(fp64, boxes_acc.data_ptr(), roi_img.data_ptr<int64_t>(), K, pa,
                                            counts.data_ptr<int64_t>(), stream),
             op);
  const at::Tensor first = (counts.cumsum(0) - counts).contiguous();
  const int64_t total = counts.sum().item<int64_t>();  // sizes the buffers (a device sync)
  const at::Tensor gt = g.reshape({K, pa.C, P}).transpose(1, 2).contiguous();  // an entry's channels contiguous
  const at::Tensor pixels = at::arange(pa.images * pa.H * pa.W + 1, lopt);
  const int64_t per_pass = kMaxEntries / 4, passes = std::max<int64_t>(1, (total + per_pass - 1) / per_pass);
  for (int64_t j = 0; j < passes; ++j) {
    const int64_t s_lo = j * per_pass, s_hi = std::min(total, s_lo + per_pass), n = 4 * (s_hi - s_lo);
    at::Tensor keys = at::empty({n}, lopt), rows = at::empty({n}, lopt);
    at::Tensor w = at::empty({n}, boxes_acc.options());
    check_cuda(cuda::roi_entries_launch(fp64, boxes_acc.data_ptr(), roi_img.data_ptr<int64_t>(),
                                        first.data_ptr<int64_t>(), K, s_lo, s_hi, pa, keys.data_ptr<int64_t>(),
                                        rows.data_ptr<int64_t>(), w.data_ptr(), stream),
               op);
    // stable: a pixel's entries keep their list order, so every run adds them in the same order
    const auto sorted = keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor perm = std::get<1>(sorted);
    const at::Tensor start = at::searchsorted(std::get<0>(sorted), pixels);
    const at::Tensor rows_s = rows.index_select(0, perm), w_s = w.index_select(0, perm);
    check_cuda(cuda::roi_segment_sum_launch(to_dtype(g.scalar_type()), start.data_ptr<int64_t>(),
                                            rows_s.data_ptr<int64_t>(), w_s.data_ptr(), gt.data_ptr(), pa, j > 0,
                                            buf.data_ptr(), stream),
               op);
  }
}

at::Tensor pool_backward(const at::Tensor& grad, const at::Tensor& boxes_acc, const at::Tensor& roi_img,
                         at::IntArrayRef sizes, int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned,
                         double spatial_scale, bool channels_last, bool deterministic, const char* op) {
  const at::ScalarType acc = acc_type(grad.scalar_type());
  at::Tensor buf = new_buffer(sizes, grad.options().dtype(acc), channels_last);
  const cuda::PoolArgs pa = pool_args(buf, ph, pw, sampling_ratio, aligned, spatial_scale);
  const int64_t K = boxes_acc.size(0);
  if (K > 0 && buf.numel() > 0) {
    const at::Tensor g = grad.contiguous();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    if (deterministic) {
      deterministic_backward(g, boxes_acc, roi_img, pa, buf, op);
    } else {
      check_cuda(cuda::roi_pool_bwd_launch(to_dtype(g.scalar_type()), g.data_ptr(), boxes_acc.data_ptr(),
                                           roi_img.data_ptr<int64_t>(), K, pa, buf.data_ptr(), stream),
                 op);
    }
  }
  return buf.scalar_type() == grad.scalar_type() ? buf : buf.to(grad.scalar_type());
}

// ---- roi_align ------------------------------------------------------------------------------------
at::Tensor roi_align_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t ph, int64_t pw,
                          int64_t sampling_ratio, bool aligned) {
  check_roi_align(input, rois, ph, pw, sampling_ratio);
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(0), C = input.size(1), K = rois.size(0);
  at::Tensor out = at::empty({K, C, ph, pw}, input.options());
  if (K == 0 || C == 0) return out;
  const at::ScalarType acc = acc_type(input.scalar_type());
  const at::Tensor boxes = rois.narrow(1, 1, 4).to(acc).contiguous();
  return pool_forward(input, boxes, roi_images(rois, N, acc), no_encoding(),
                      pool_args(input, ph, pw, sampling_ratio, aligned, spatial_scale), out, "roi_align");
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale, int64_t ph,
                                   int64_t pw, int64_t sampling_ratio, bool aligned, int64_t N, int64_t H, int64_t W,
                                   bool channels_last, bool deterministic) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(2) == ph && grad.size(3) == pw, "roi_align_backward: grad must be [K, C, ",
              ph, ", ", pw, "], got ", grad.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5 && rois.size(0) == grad.size(0),
              "roi_align_backward: rois must be [K, 5] with K = ", grad.size(0), ", got ", rois.sizes());
  c10::cuda::CUDAGuard guard(grad.device());
  const at::ScalarType acc = acc_type(grad.scalar_type());
  const at::Tensor boxes = rois.narrow(1, 1, 4).to(acc).contiguous();
  return pool_backward(grad, boxes, roi_images(rois, N, acc), {N, grad.size(1), H, W}, ph, pw, sampling_ratio, aligned,
                       spatial_scale, channels_last, deterministic, "roi_align_backward");
}

// ---- region_pool ----------------------------------------------------------------------------------
at::Tensor region_pool_cuda(const at::Tensor& features, const at::Tensor& boxes, const c10::optional<at::Tensor>& valid,
                            const c10::optional<at::Tensor>& timestamps, const c10::optional<at::Tensor>& table,
                            double spatial_scale, int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned,
                            double base) {
  check_region_pool(features, boxes, valid, timestamps, table, ph, pw, sampling_ratio);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), T = features.size(1), C = features.size(2), R = boxes.size(2);
  at::Tensor out = at::empty({B, T, R, C, ph, pw}, features.options());
  if (B * T * R == 0 || C == 0) return out;
  const at::ScalarType acc = acc_type(features.scalar_type());
  EncoderInputs keep;
  const cuda::EncArgs enc = encoding(timestamps, table, C, base, acc, "region_pool", keep);
  const at::Tensor bx = boxes.to(acc).reshape({B * T * R, 4}).contiguous();
  return pool_forward(features, bx, region_images(boxes, valid), enc,
                      pool_args(features, ph, pw, sampling_ratio, aligned, spatial_scale), out, "region_pool");
}

at::Tensor region_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& boxes,
                                     const c10::optional<at::Tensor>& valid, double spatial_scale, int64_t ph,
                                     int64_t pw, int64_t sampling_ratio, bool aligned, int64_t H, int64_t W,
                                     bool channels_last, bool deterministic) {
  TORCH_CHECK(grad.dim() == 6 && grad.size(4) == ph && grad.size(5) == pw,
              "region_pool_backward: grad must be [B, T, R, C, ph, pw], got ", grad.sizes());
  TORCH_CHECK(boxes.dim() == 4 && boxes.size(0) == grad.size(0) && boxes.size(1) == grad.size(1) &&
                  boxes.size(2) == grad.size(2) && boxes.size(3) == 4,
              "region_pool_backward: boxes must be [B, T, R, 4] matching grad, got ", boxes.sizes());
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t B = grad.size(0), T = grad.size(1), R = grad.size(2), C = grad.size(3);
  const at::ScalarType acc = acc_type(grad.scalar_type());
  const at::Tensor bx = boxes.to(acc).reshape({B * T * R, 4}).contiguous();
  return pool_backward(grad.reshape({B * T * R, C, ph, pw}), bx, region_images(boxes, valid), {B, T, C, H, W}, ph, pw,
                       sampling_ratio, aligned, spatial_scale, channels_last, deterministic, "region_pool_backward");
}

// ---- mask_pool ------------------------------------------------------------------------------------
cuda::MaskArgs mask_args(const at::Tensor& f, const at::Tensor& masks) {
  cuda::MaskArgs ma;
  ma.B = f.size(0);
  ma.T = std::max<int64_t>(f.size(1), 1);
  ma.C = f.size(2);
  ma.H = f.size(3);
  ma.W = f.size(4);
  ma.R = masks.size(2);
  ma.Hm = masks.size(3);
  ma.Wm = masks.size(4);
  ma.s0 = f.stride(0);
  ma.s1 = f.stride(1);
  ma.sC = f.stride(2);
  ma.sH = f.stride(3);
  ma.sW = f.stride(4);
  return ma;
}

std::pair<at::Tensor, at::Tensor> resize(const at::Tensor& features, const at::Tensor& masks, double eps,
                                         const cuda::MaskArgs& ma, at::ScalarType acc) {
  const int64_t n = ma.B * features.size(1) * ma.R;
  const at::Tensor m = masks.to(acc).contiguous();
  at::Tensor mt = at::empty({n, ma.H * ma.W}, features.options().dtype(acc));
  at::Tensor invz = at::empty({n}, features.options().dtype(acc));
  check_cuda(cuda::mask_resize_launch(acc == at::kDouble ? DType::kFloat64 : DType::kFloat32, m.data_ptr(), ma, eps,
                                      mt.data_ptr(), invz.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "mask_pool resize");
  return {mt, invz};
}

// (out, resized masks [B, T, R, H, W], 1 / (sum + eps) [B, T, R]): the backward reuses the last two.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_pool_cuda(const at::Tensor& features, const at::Tensor& masks,
                                                              const c10::optional<at::Tensor>& timestamps,
                                                              const c10::optional<at::Tensor>& table, double eps,
                                                              double base) {
  check_mask_pool(features, masks, timestamps, table);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), T = features.size(1), C = features.size(2), R = masks.size(2),
                H = features.size(3), W = features.size(4);
  at::Tensor out = at::empty({B, T, R, C}, features.options());
  const at::ScalarType acc = acc_type(features.scalar_type());
  const cuda::MaskArgs ma = mask_args(features, masks);
  at::Tensor mt, invz;
  if (B * T * R > 0) {
    std::tie(mt, invz) = resize(features, masks, eps, ma, acc);
  } else {
    mt = at::empty({0, H * W}, features.options().dtype(acc));
    invz = at::empty({0}, features.options().dtype(acc));
  }
  const std::tuple<at::Tensor, at::Tensor, at::Tensor> result{out, mt.view({B, T, R, H, W}), invz.view({B, T, R})};
  if (B * T * R == 0 || C == 0) return result;
  EncoderInputs keep;
  const cuda::EncArgs enc = encoding(timestamps, table, C, base, acc, "mask_pool", keep);
  check_cuda(cuda::mask_pool_fwd_launch(to_dtype(features.scalar_type()), features.data_ptr(), mt.data_ptr(),
                                        invz.data_ptr(), enc, ma, out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "mask_pool");
  return result;
}

std::tuple<at::Tensor, at::Tensor> mask_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& features,
                                                           const at::Tensor& masks, const at::Tensor& resized,
                                                           const at::Tensor& inv_z, bool need_features_grad,
                                                           bool need_masks_grad, bool channels_last) {
  check_mask_pool(features, masks, c10::nullopt, c10::nullopt);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), T = features.size(1), C = features.size(2), R = masks.size(2);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == B && grad.size(1) == T && grad.size(2) == R && grad.size(3) == C,
              "mask_pool_backward: grad must be [B, T, R, C], got ", grad.sizes());
  const at::ScalarType acc = acc_type(features.scalar_type());
  check_saved_masks(resized, inv_z, B, T, R, features.size(3), features.size(4), acc, "mask_pool_backward");
  check_same_device(features, resized, "resized", "mask_pool_backward");
  at::Tensor gf = need_features_grad ? new_buffer(features.sizes(), features.options(), channels_last)
                                     : at::empty({0}, features.options());
  at::Tensor gm = need_masks_grad ? at::zeros(masks.sizes(), masks.options()) : at::empty({0}, masks.options());
  if (B * T * R == 0 || C == 0 || !(need_features_grad || need_masks_grad)) return {gf, gm};
  const cuda::MaskArgs ma = mask_args(features, masks);
  // the forward's resize, not redone: [BTR, H*W] and [BTR]
  const at::Tensor mt = resized.contiguous().view({B * T * R, ma.H * ma.W});
  const at::Tensor invz = inv_z.contiguous().view({B * T * R});
  const at::Tensor gn = (grad.to(acc) * invz.view({B, T, R, 1})).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (need_features_grad) {
    cuda::MaskArgs mg = ma;  // strides of the gradient buffer
    mg.s0 = gf.stride(0);
    mg.s1 = gf.stride(1);
    mg.sC = gf.stride(2);
    mg.sH = gf.stride(3);
    mg.sW = gf.stride(4);
    check_cuda(cuda::mask_pool_dfeat_launch(to_dtype(features.scalar_type()), gn.data_ptr(), mt.data_ptr(), mg,
                                            gf.data_ptr(), stream),
               "mask_pool_backward");
  }
  if (need_masks_grad) {
    at::Tensor gfr = at::empty({B * T * R, ma.H * ma.W}, features.options().dtype(acc));
    check_cuda(cuda::mask_pool_gf_launch(to_dtype(features.scalar_type()), gn.data_ptr(), features.data_ptr(), ma,
                                         gfr.data_ptr(), stream),
               "mask_pool_backward");
    // d out / d m~_p = (f_p - out) / Z: the mean term s = sum_p (m~_p / Z) GF_p (GF carries 1 / Z).
    const at::Tensor s = ((mt * gfr).sum(-1) * invz).contiguous();
    at::Tensor gmb = at::empty({B * T * R, ma.Hm, ma.Wm}, features.options().dtype(acc));
    check_cuda(cuda::mask_resize_transpose_launch(acc == at::kDouble ? DType::kFloat64 : DType::kFloat32,
                                                  gfr.data_ptr(), s.data_ptr(), ma, gmb.data_ptr(), stream),
               "mask_pool_backward");
    gm.copy_(gmb.view(masks.sizes()));
  }
  return {gf, gm};
}

}  // namespace

TORCH_LIBRARY_IMPL(rgpt4d, CUDA, m) {
  m.impl("roi_align", &roi_align_cuda);
  m.impl("roi_align_backward", &roi_align_backward_cuda);
  m.impl("region_pool", &region_pool_cuda);
  m.impl("region_pool_backward", &region_pool_backward_cuda);
  m.impl("mask_pool", &mask_pool_cuda);
  m.impl("mask_pool_backward", &mask_pool_backward_cuda);
}

}  // namespace rgpt4d
