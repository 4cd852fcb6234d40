// Shape/dtype checks shared by the CPU and CUDA bindings of the regional ops. The Python layer
// validates user input first, with friendlier messages; these checks keep the kernels memory-safe
// when it is skipped (validate=False) or when an op is called directly.
#pragma once

#include <ATen/ATen.h>

#include "common/acc.h"

namespace rgpt4d {

inline void check_float_tensor(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name, const char* op) {
  TORCH_CHECK(b.device() == a.device(), op, ": ", name, " must be on ", a.device(), ", got ", b.device());
}

inline void check_pool_params(int64_t ph, int64_t pw, int64_t sampling_ratio, const char* op) {
  (void)sampling_ratio;  // any value: <= 0 means adaptive
  TORCH_CHECK(ph >= 1 && pw >= 1, op, ": output_size must be positive, got (", ph, ", ", pw, ")");
}

inline void check_roi_align(const at::Tensor& input, const at::Tensor& rois, int64_t ph, int64_t pw,
                            int64_t sampling_ratio) {
  const char* op = "roi_align";
  TORCH_CHECK(input.dim() == 4, op, ": input must be [N, C, H, W], got ", input.sizes());
  check_float_tensor(input, "input", op);
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be [K, 5] (batch index, x1, y1, x2, y2), got ",
              rois.sizes());
  check_float_tensor(rois, "rois", op);
  check_same_device(input, rois, "rois", op);
  check_pool_params(ph, pw, sampling_ratio, op);
}

inline void check_encoder(const at::Tensor& ref, int64_t B, int64_t T, int64_t C,
                          const c10::optional<at::Tensor>& timestamps, const c10::optional<at::Tensor>& table,
                          const char* op) {
  const bool has_ts = timestamps.has_value() && timestamps->defined();
  const bool has_table = table.has_value() && table->defined();
  TORCH_CHECK(has_ts || !has_table, op, ": a TPE table needs timestamps (its row per frame)");
  if (!has_ts) return;
  TORCH_CHECK(timestamps->dim() == 2 && timestamps->size(0) == B && timestamps->size(1) == T, op,
              ": timestamps must be [B, T] = [", B, ", ", T, "], got ", timestamps->sizes());
  check_same_device(ref, *timestamps, "timestamps", op);
  if (has_table) {
    TORCH_CHECK(table->dim() == 2 && table->size(1) == C, op, ": table must be [L, C] with C = ", C, ", got ",
                table->sizes());
    check_same_device(ref, *table, "table", op);
    TORCH_CHECK(!at::isFloatingType(timestamps->scalar_type()), op,
                ": with a table, timestamps must be integer row indices, got ", timestamps->scalar_type());
  } else {
    TORCH_CHECK(at::isFloatingType(timestamps->scalar_type()), op,
                ": without a table, timestamps must be float seconds, got ", timestamps->scalar_type());
  }
}

inline void check_region_pool(const at::Tensor& features, const at::Tensor& boxes, const c10::optional<at::Tensor>& valid,
                              const c10::optional<at::Tensor>& timestamps, const c10::optional<at::Tensor>& table,
                              int64_t ph, int64_t pw, int64_t sampling_ratio) {
  const char* op = "region_pool";
  TORCH_CHECK(features.dim() == 5, op, ": features must be [B, T, C, H, W], got ", features.sizes());
  check_float_tensor(features, "features", op);
  const int64_t B = features.size(0), T = features.size(1);
  TORCH_CHECK(boxes.dim() == 4 && boxes.size(0) == B && boxes.size(1) == T && boxes.size(3) == 4, op,
              ": boxes must be [B, T, R, 4] = [", B, ", ", T, ", R, 4], got ", boxes.sizes());
  check_float_tensor(boxes, "boxes", op);
  check_same_device(features, boxes, "boxes", op);
  if (valid.has_value() && valid->defined()) {
    TORCH_CHECK(valid->dim() == 3 && valid->size(0) == B && valid->size(1) == T && valid->size(2) == boxes.size(2), op,
                ": valid must be [B, T, R] = [", B, ", ", T, ", ", boxes.size(2), "], got ", valid->sizes());
    TORCH_CHECK(valid->scalar_type() == at::kBool, op, ": valid must be a bool tensor, got ", valid->scalar_type());
    check_same_device(features, *valid, "valid", op);
  }
  check_encoder(features, B, T, features.size(2), timestamps, table, op);
  check_pool_params(ph, pw, sampling_ratio, op);
}

inline void check_mask_pool(const at::Tensor& features, const at::Tensor& masks,
                            const c10::optional<at::Tensor>& timestamps, const c10::optional<at::Tensor>& table) {
  const char* op = "mask_pool";
  TORCH_CHECK(features.dim() == 5, op, ": features must be [B, T, C, H, W], got ", features.sizes());
  check_float_tensor(features, "features", op);
  const int64_t B = features.size(0), T = features.size(1);
  TORCH_CHECK(masks.dim() == 5 && masks.size(0) == B && masks.size(1) == T, op, ": masks must be [B, T, R, Hm, Wm] = [",
              B, ", ", T, ", R, Hm, Wm], got ", masks.sizes());
  check_float_tensor(masks, "masks", op);
  check_same_device(features, masks, "masks", op);
  TORCH_CHECK(features.size(3) > 0 && features.size(4) > 0, op, ": the feature grid must be non-empty, got ",
              features.size(3), " x ", features.size(4));
  TORCH_CHECK(masks.size(3) > 0 && masks.size(4) > 0, op, ": masks must have a non-empty grid, got ", masks.size(3),
              " x ", masks.size(4));
  check_encoder(features, B, T, features.size(2), timestamps, table, op);
}

// The forward's saved outputs handed to mask_pool_backward: resized [B, T, R, H, W] and
// inv_z [B, T, R], both in the accumulation dtype.
inline void check_saved_masks(const at::Tensor& resized, const at::Tensor& inv_z, int64_t B, int64_t T, int64_t R,
                              int64_t H, int64_t W, at::ScalarType acc, const char* op) {
  TORCH_CHECK(resized.dim() == 5 && resized.size(0) == B && resized.size(1) == T && resized.size(2) == R &&
                  resized.size(3) == H && resized.size(4) == W,
              op, ": resized must be [B, T, R, H, W] = [", B, ", ", T, ", ", R, ", ", H, ", ", W, "], got ",
              resized.sizes());
  TORCH_CHECK(inv_z.dim() == 3 && inv_z.size(0) == B && inv_z.size(1) == T && inv_z.size(2) == R, op,
              ": inv_z must be [B, T, R] = [", B, ", ", T, ", ", R, "], got ", inv_z.sizes());
  TORCH_CHECK(resized.scalar_type() == acc && inv_z.scalar_type() == acc, op,
              ": resized and inv_z must be in the accumulation dtype ", acc, ", got ", resized.scalar_type(), " and ",
              inv_z.scalar_type());
  TORCH_CHECK(resized.device() == inv_z.device(), op, ": resized and inv_z must be on one device");
}

// Memory layout of a [..., C, H, W] feature map the kernels can read without a copy:
// channels-last (C stride 1: a pixel's channels are contiguous) or planar (W stride 1).
struct FeatLayout {
  bool channels_last;
  int64_t sC, sH, sW;
};

// The layout of the last three dims of `t` if a kernel can read it in place, else nullopt.
inline c10::optional<FeatLayout> feature_layout(const at::Tensor& t) {
  const int64_t d = t.dim();
  const int64_t sC = t.stride(d - 3), sH = t.stride(d - 2), sW = t.stride(d - 1);
  if (t.size(d - 3) == 1 || sC == 1) {
    if (t.size(d - 3) > 1 || sW != 1) return FeatLayout{true, 1, sH, sW};
  }
  if (t.size(d - 1) == 1 || sW == 1) return FeatLayout{false, sC, sH, 1};
  return c10::nullopt;
}

}  // namespace rgpt4d
