// Launchers of the regional CUDA kernels, over raw pointers (no torch types): regional_cuda.cpp
// binds them to tensors. Pointers named *_acc hold the accumulation type: double when dt is
// kFloat64, float otherwise.
#pragma once

#include <cuda_runtime_api.h>

#include "common/hd.h"
#include "tpe/tpe_cuda.h"  // EncArgs: the per-frame TPE (table rows or seconds)

namespace rgpt4d {
namespace cuda {

// RoI pooling geometry and the layout of the map it reads (or the gradient it writes). Image i
// starts at element (i / img_inner) * s_outer + (i % img_inner) * s_inner; pixel (c, y, x) of an
// image at c * sC + y * sH + x * sW.
struct PoolArgs {
  int64_t C, H, W, ph, pw, sampling_ratio;
  bool aligned;
  double spatial_scale;
  int64_t images, img_inner, s_outer, s_inner, sC, sH, sW;
};

// out [K, C, ph, pw] (dt). boxes_acc [K, 4]; roi_img [K]: image of each RoI, or outside
// [0, images) to skip it (zero output). enc: the TPE of image roi_img[k], or enc.D == 0 for none.
cudaError_t roi_pool_fwd_launch(DType dt, const void* feat, const void* boxes_acc, const int64_t* roi_img,
                                EncArgs enc, int64_t K, PoolArgs pa, void* out, cudaStream_t stream);

// gbuf_acc (zero-initialised, layout pa) += adjoint of the pooling applied to grad [K, C, ph, pw],
// one thread per (RoI, channel, bin) with float atomics.
cudaError_t roi_pool_bwd_launch(DType dt, const void* grad, const void* boxes_acc, const int64_t* roi_img, int64_t K,
                                PoolArgs pa, void* gbuf_acc, cudaStream_t stream);

// The deterministic backward (entries sorted by target pixel: regional_math.h), in three launches
// around a stable sort done by the caller. boxes_acc / w_acc: double when fp64, else float.
// counts [K] = samples of each RoI (0 when roi_img[k] is outside [0, images)).
cudaError_t roi_sample_counts_launch(bool fp64, const void* boxes_acc, const int64_t* roi_img, int64_t K, PoolArgs pa,
                                     int64_t* counts, cudaStream_t stream);
// keys / rows / w_acc [4 (s_hi - s_lo)]: the entries of the samples s_lo .. s_hi of the flat list in
// which RoI k's samples start at first[k].
cudaError_t roi_entries_launch(bool fp64, const void* boxes_acc, const int64_t* roi_img, const int64_t* first,
                               int64_t K, int64_t s_lo, int64_t s_hi, PoolArgs pa, int64_t* keys, int64_t* rows,
                               void* w_acc, cudaStream_t stream);
// gbuf_acc[pixel p, c] = (accumulate ? gbuf_acc : 0) + sum over the sorted entries i in
// [start[p], start[p + 1]) of w[i] * gt[rows[i], c], in order. gt: grad as [K * ph * pw, C] (dt).
cudaError_t roi_segment_sum_launch(DType dt, const int64_t* start, const int64_t* rows, const void* w_acc,
                                   const void* gt, PoolArgs pa, bool accumulate, void* gbuf_acc, cudaStream_t stream);

// Mask pooling. Features [B, T, C, H, W] through strides (s0, s1, sC, sH, sW); masks_acc
// [B*T*R, Hm, Wm] contiguous in the accumulation type.
struct MaskArgs {
  int64_t B, T, R, C, H, W, Hm, Wm;
  int64_t s0, s1, sC, sH, sW;
};

// mt_acc [BTR, H*W] resized masks, invz_acc [BTR] = 1 / (sum + eps).
cudaError_t mask_resize_launch(DType dt, const void* masks_acc, MaskArgs ma, double eps, void* mt_acc, void* invz_acc,
                               cudaStream_t stream);

// out [B, T, R, C] = (sum_p mt[r, p] f[c, p]) * invz[r] + enc[c].
cudaError_t mask_pool_fwd_launch(DType dt, const void* feat, const void* mt_acc, const void* invz_acc, EncArgs enc,
                                 MaskArgs ma, void* out, cudaStream_t stream);

// grad_f (dt, layout ma's strides) [c, p] = sum_r mt[r, p] * gn[r, c]; gn_acc = grad / Z [BTR, C].
cudaError_t mask_pool_dfeat_launch(DType dt, const void* gn_acc, const void* mt_acc, MaskArgs ma, void* grad_f,
                                   cudaStream_t stream);

// gfr_acc [BTR, H*W] = sum_c gn[r, c] * f[c, p].
cudaError_t mask_pool_gf_launch(DType dt, const void* gn_acc, const void* feat, MaskArgs ma, void* gfr_acc,
                                cudaStream_t stream);

// grad_masks_acc [BTR, Hm, Wm] = transpose of the resize applied to (gfr - s[m]) (gather form).
cudaError_t mask_resize_transpose_launch(DType dt, const void* gfr_acc, const void* s_acc, MaskArgs ma,
                                         void* grad_masks_acc, cudaStream_t stream);

}  // namespace cuda
}  // namespace rgpt4d
