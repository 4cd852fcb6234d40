// Shape/dtype checks and dtype helpers shared by the CPU and CUDA bindings of the TPE ops.
// The Python layer validates user input with friendlier messages first; these checks keep the
// kernels memory-safe when it is skipped (validate=False) or when the op is called directly.
#pragma once

#include <ATen/ATen.h>

#include "common/acc.h"

namespace rgpt4d {


inline void check_tpe_shapes(const at::Tensor& x, const at::Tensor& timestamps,
                             const c10::optional<at::Tensor>& table, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be [B, T, N, D], got ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), op, ": x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(timestamps.dim() == 2 && timestamps.size(0) == x.size(0) && timestamps.size(1) == x.size(1), op,
              ": timestamps must be [B, T] = [", x.size(0), ", ", x.size(1), "], got ", timestamps.sizes());
  TORCH_CHECK(timestamps.device() == x.device(), op, ": timestamps must be on ", x.device(), ", got ",
              timestamps.device());
  if (table.has_value() && table->defined()) {
    TORCH_CHECK(table->dim() == 2 && table->size(1) == x.size(3), op, ": table must be [L, D] with D = ", x.size(3),
                ", got ", table->sizes());
    TORCH_CHECK(table->device() == x.device(), op, ": table must be on ", x.device(), ", got ", table->device());
    TORCH_CHECK(!at::isFloatingType(timestamps.scalar_type()), op,
                ": with a table, timestamps must be integer row indices, got ", timestamps.scalar_type());
  } else {
    TORCH_CHECK(at::isFloatingType(timestamps.scalar_type()), op,
                ": without a table, timestamps must be float seconds, got ", timestamps.scalar_type());
  }
}

inline void check_ds_ln_shapes(const at::Tensor& x, const at::Tensor& timestamps,
                               const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, int64_t h, int64_t w, int64_t window,
                               const char* op) {
  check_tpe_shapes(x, timestamps, table, op);
  TORCH_CHECK(h >= 1 && w >= 1 && h * w == x.size(2), op, ": grid (h, w) = (", h, ", ", w,
              ") must have h*w equal to x.size(2) = ", x.size(2));
  TORCH_CHECK(window >= 1, op, ": window must be >= 1, got ", window);
  const int64_t K = window * window * x.size(3);
  if (weight.has_value() && weight->defined())
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == K && weight->device() == x.device(), op,
                ": weight must be [window^2 * D] = [", K, "] on ", x.device(), ", got ", weight->sizes());
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K && bias->device() == x.device(), op,
                ": bias must be [window^2 * D] = [", K, "] on ", x.device(), ", got ", bias->sizes());
}

// Tensors the frame encoder reads, converted once to the accumulation dtype (both are tiny):
// table rows + int64 indices for the learned variant, or seconds for the sinusoidal one.
struct EncoderInputs {
  at::Tensor table, rows, seconds;
};

// check_range=true reads the indices on the host (a device sync on CUDA, so the CUDA binding
// leaves it to the Python validation) and rejects any index outside the table.
inline EncoderInputs prepare_encoder(const at::Tensor& timestamps, const c10::optional<at::Tensor>& table,
                                     at::ScalarType acc_dt, const char* op, bool check_range) {
  EncoderInputs in;
  if (table.has_value() && table->defined()) {
    in.table = table->to(acc_dt).contiguous();
    in.rows = timestamps.to(at::kLong).contiguous();
    if (check_range && in.rows.numel() > 0) {
      auto mm = at::aminmax(in.rows);
      const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < in.table.size(0), op, ": timestamps must index rows of table in [0, ",
                  in.table.size(0), "), got values in [", lo, ", ", hi, "]");
    }
  } else {
    in.seconds = timestamps.to(acc_dt).contiguous();
  }
  return in;
}

}  // namespace rgpt4d
