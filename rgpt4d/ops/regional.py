"""Regional pooling ops: RoIAlign, 4D region pooling with a fused TPE, soft-mask pooling.

- ``roi_align`` / ``RoIAlign``: a drop-in for torchvision.ops.roi_align / RoIAlign (same arguments,
  defaults, numbers and exception types; fx leaf; scriptable, see roi_align), bf16 native.
- ``region_pool``: the 4D regional encoder's hot loop: RoIAlign of R boxes on each of the T frames
  of B videos, an optional ``valid`` mask (absent region -> zero token, no gradient), and the TPE
  of ``tpe_add`` added to each region token inside the same kernel.
- ``mask_pool``: SpatialRGPT-style soft masked average per region and frame, masks resized to the
  feature grid inside the op exactly as ``F.interpolate(mode="bilinear", align_corners=False)``.

RoIAlign semantics (torchvision's; derived in csrc/regional/regional_math.h): the box is scaled by
``spatial_scale`` (and shifted by -0.5 with ``aligned``; without it the box is at least 1x1), cut
into ph x pw bins, and each bin averages grid_h x grid_w bilinear samples (``sampling_ratio``, or
ceil(bin size) when <= 0). Samples more than one pixel outside the map contribute zero.

Non-finite box coordinates (nan/inf): the RoI samples nothing, so its pooled value is zero and it
receives no gradient (torchvision's CPU kernel gives zeros for nan and crashes on inf). region_pool
still adds the TPE to such a token when the region is valid; use ``valid`` to drop a region.

Backends (rgpt4d/ops/registry.py): eager (this file), cpu/cuda (csrc/regional/), triton
(kernels/regional.py).
"""

import math
from typing import List, Optional, Sequence, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from rgpt4d.ops.registry import Family, acc_dtype, check_values
from rgpt4d.ops.tpe import frame_encoding_eager

# ---------------------------------------------------------------------------------------------
# Eager references (readable; the tests run them in float64 as the oracle)
# ---------------------------------------------------------------------------------------------


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """A list of per-image boxes [L_i, 4] -> rois [sum L_i, 5] (batch index, x1, y1, x2, y2)."""
    boxes = list(boxes)
    if not boxes:
        return torch.zeros(0, 5)
    dtype = boxes[0].dtype
    idx = torch.cat([torch.full((b.shape[0], 1), float(i), dtype=dtype, device=b.device) for i, b in enumerate(boxes)])
    return torch.cat([idx, torch.cat([b.to(dtype) for b in boxes])], dim=1)


def _axis_samples(start: Tensor, bin_size: Tensor, grid: Tensor, cells: int, size: int, max_grid: int):
    """Bilinear taps of every sample along one axis, for K RoIs.

    Returns (lo, hi, w_lo, w_hi), each [K, cells, max_grid]; samples past a RoI's grid, and samples
    more than one pixel outside [0, size], get zero weights.
    """
    acc = start.dtype
    cell = torch.arange(cells, device=start.device, dtype=acc).view(1, cells, 1)
    s = torch.arange(max_grid, device=start.device, dtype=acc).view(1, 1, max_grid)
    g = grid.to(acc).clamp(min=1).view(-1, 1, 1)
    v = start.view(-1, 1, 1) + cell * bin_size.view(-1, 1, 1) + (s + 0.5) * bin_size.view(-1, 1, 1) / g
    used = s < grid.view(-1, 1, 1)
    v = torch.where(used, v, torch.zeros_like(v))
    inside = (v >= -1.0) & (v <= size) & used
    v = v.clamp(min=0.0)
    lo = v.floor().long()
    at_edge = lo >= size - 1
    lo = torch.where(at_edge, torch.full_like(lo, size - 1), lo)
    hi = torch.where(at_edge, lo, lo + 1)
    frac = torch.where(at_edge, torch.zeros_like(v), v - lo.to(acc))
    w_lo = torch.where(inside, 1.0 - frac, torch.zeros_like(v))
    w_hi = torch.where(inside, frac, torch.zeros_like(v))
    return lo.clamp(min=0), hi.clamp(min=0), w_lo, w_hi


def _roi_grid(roi_size: Tensor, pooled: int, sampling_ratio: int, finite: Tensor) -> Tensor:
    if sampling_ratio > 0:
        g = torch.full_like(roi_size, float(sampling_ratio))
    else:
        g = torch.ceil(roi_size / pooled).clamp(min=0, max=2**30)
    return torch.where(finite, g, torch.zeros_like(g)).long()


def roi_align_eager(input: Tensor, rois: Union[Tensor, Sequence[Tensor]], output_size, spatial_scale: float = 1.0,
                    sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Plain-PyTorch RoIAlign: bilinear samples gathered from the map, averaged per bin."""
    if not isinstance(rois, Tensor):
        rois = boxes_to_rois(rois)
    ph, pw = _pair(output_size)
    N, C, H, W = input.shape
    K = rois.shape[0]
    acc = acc_dtype(input.dtype)
    out = input.new_zeros((K, C, ph, pw), dtype=acc)
    if K == 0 or C == 0 or H == 0 or W == 0:
        return (out + input.flatten()[:0].sum()).to(input.dtype)  # stays connected to input for autograd
    r = rois.to(acc)
    batch = r[:, 0].long()
    off = 0.5 if aligned else 0.0
    x1, y1 = r[:, 1] * spatial_scale - off, r[:, 2] * spatial_scale - off
    x2, y2 = r[:, 3] * spatial_scale - off, r[:, 4] * spatial_scale - off
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    finite = torch.isfinite(torch.stack([x1, y1, x2, y2])).all(0)
    zero = torch.zeros_like(x1)
    x1, y1 = torch.where(finite, x1, zero), torch.where(finite, y1, zero)
    roi_w, roi_h = torch.where(finite, roi_w, zero), torch.where(finite, roi_h, zero)
    grid_h = _roi_grid(roi_h, ph, sampling_ratio, finite)
    grid_w = _roi_grid(roi_w, pw, sampling_ratio, finite)
    count = (grid_h * grid_w).clamp(min=1).to(acc)
    x = input.to(acc).permute(0, 2, 3, 1)  # [N, H, W, C]: a pixel's channels in one gather
    chunks = []
    # RoIs in chunks so the gathered samples [k, ph*gh, pw*gw, C] stay around 16M elements.
    k0 = 0
    while k0 < K:
        gh = max(1, int(grid_h[k0:k0 + 1].max()))
        gw = max(1, int(grid_w[k0:k0 + 1].max()))
        step = max(1, (1 << 24) // max(1, ph * gh * pw * gw * C))
        k1 = min(K, k0 + step)
        sl = slice(k0, k1)
        gh = max(1, int(grid_h[sl].max()))
        gw = max(1, int(grid_w[sl].max()))
        ylo, yhi, wylo, wyhi = _axis_samples(y1[sl], roi_h[sl] / ph, grid_h[sl], ph, H, gh)
        xlo, xhi, wxlo, wxhi = _axis_samples(x1[sl], roi_w[sl] / pw, grid_w[sl], pw, W, gw)
        n = batch[sl].view(-1, 1, 1, 1, 1)
        acc_k = 0
        for yi, wy in ((ylo, wylo), (yhi, wyhi)):
            for xi, wx in ((xlo, wxlo), (xhi, wxhi)):
                # [k, ph, gh, 1, 1] x [k, 1, 1, pw, gw] -> a sample grid per RoI
                v = x[n, yi.view(*yi.shape, 1, 1), xi.view(xi.shape[0], 1, 1, *xi.shape[1:])]
                w = wy.view(*wy.shape, 1, 1) * wx.view(wx.shape[0], 1, 1, *wx.shape[1:])
                acc_k = acc_k + v * w.unsqueeze(-1)
        pooled = acc_k.sum(dim=(2, 4)) / count[sl].view(-1, 1, 1, 1)  # [k, ph, pw, C]
        chunks.append(pooled.permute(0, 3, 1, 2))
        k0 = k1
    return torch.cat(chunks).to(input.dtype).contiguous()


def _cl_to_bt_chw(features: Tensor) -> Tensor:
    return features.permute(0, 1, 4, 2, 3)


def region_pool_eager(features: Tensor, boxes: Tensor, *, output_size=(1, 1), spatial_scale: float = 1.0,
                      sampling_ratio: int = -1, aligned: bool = True, valid: Optional[Tensor] = None,
                      timestamps: Optional[Tensor] = None, table: Optional[Tensor] = None, base: float = 10000.0,
                      channels_last: bool = False) -> Tensor:
    """RoIAlign of every frame's boxes (frames as images) + the TPE of each frame + the valid mask."""
    if channels_last:
        features = _cl_to_bt_chw(features)
    B, T, C, H, W = features.shape
    R = boxes.shape[2]
    ph, pw = _pair(output_size)
    acc = acc_dtype(features.dtype)
    frame = torch.arange(B * T, device=boxes.device).repeat_interleave(R).to(boxes.dtype)
    rois = torch.cat([frame[:, None], boxes.reshape(B * T * R, 4)], dim=1)
    out = roi_align_eager(features.reshape(B * T, C, H, W).to(acc), rois, (ph, pw), spatial_scale, sampling_ratio,
                          aligned).view(B, T, R, C, ph, pw)
    if timestamps is not None:
        enc = frame_encoding_eager(timestamps, C, table, base, acc)  # [B, T, C]
        out = out + enc.view(B, T, 1, C, 1, 1)
    if valid is not None:
        out = torch.where(valid.view(B, T, R, 1, 1, 1), out, torch.zeros_like(out))
    out = out.to(features.dtype)
    return out.view(B, T, R, C) if (ph, pw) == (1, 1) else out


def resize_masks_eager(masks: Tensor, size: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """masks [B, T, R, Hm, Wm] -> [B, T, R, H, W] in `dtype`, bilinear, align_corners=False."""
    B, T, R, Hm, Wm = masks.shape
    m = masks.reshape(B * T * R, 1, Hm, Wm).to(dtype)
    if B * T * R == 0:
        return m.new_zeros((B, T, R) + tuple(size)) + m.sum()  # stays connected to masks for autograd
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False).view(B, T, R, *size)


def mask_pool_eager(features: Tensor, masks: Tensor, *, eps: float = 1e-8, timestamps: Optional[Tensor] = None,
                    table: Optional[Tensor] = None, base: float = 10000.0, channels_last: bool = False) -> Tensor:
    """Soft masked average: interpolate the masks to the grid, sum(f * m) / (sum(m) + eps), + TPE."""
    if channels_last:
        features = _cl_to_bt_chw(features)
    B, T, C, H, W = features.shape
    acc = acc_dtype(features.dtype)
    m = resize_masks_eager(masks, (H, W), acc).flatten(3)  # [B, T, R, HW]
    f = features.to(acc).flatten(3)  # [B, T, C, HW]
    out = torch.einsum("btrp,btcp->btrc", m, f) / (m.sum(-1, keepdim=True) + eps)
    if timestamps is not None:
        out = out + frame_encoding_eager(timestamps, C, table, base, acc).unsqueeze(2)
    return out.to(features.dtype)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def _check_output_size(op: str, output_size) -> tuple[int, int]:
    ok = isinstance(output_size, int) or (
        isinstance(output_size, (tuple, list)) and len(output_size) == 2 and all(isinstance(v, int) for v in output_size))
    if not ok or min(_pair(output_size)) < 1:
        raise ValueError(f"{op}: output_size must be a positive int or a pair of positive ints, got {output_size!r}")
    return _pair(output_size)


def _check_features(op: str, features, name: str, ndim: int, layout: str) -> None:
    if not isinstance(features, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor {layout}, got {type(features).__name__}")
    if features.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {features.dtype}")


def _check_float_on(op: str, t, name: str, ref: Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the features' device {ref.device}, got {t.device}")


def _validate_roi_align(input, boxes, output_size, sampling_ratio, values: bool) -> Tensor:
    """Checks roi_align's arguments (the box shapes are checked before, by _check_boxes_shape) and
    returns the boxes as rois [K, 5]."""
    op = "roi_align"
    _check_features(op, input, "input", 4, "[N, C, H, W]")
    _check_output_size(op, output_size)
    if not isinstance(sampling_ratio, int):
        raise TypeError(f"{op}: sampling_ratio must be an int (<= 0: adaptive), got {sampling_ratio!r}")
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            _check_float_on(op, b, f"boxes[{i}]", input)
        rois = boxes_to_rois(boxes).to(input.device)
    else:
        rois = boxes
    _check_float_on(op, rois, "boxes", input)
    if values and rois.shape[0] > 0:
        idx = rois[:, 0]
        lo, hi = float(idx.min()), float(idx.max())
        # torchvision truncates the index toward zero: (-1, N) is what reaches [0, N).
        if not (lo > -1 and hi < input.shape[0]) or not bool(torch.isfinite(idx).all()):
            raise IndexError(f"{op}: boxes[:, 0] (batch index) must be in [0, N) = [0, {input.shape[0]}), got values "
                             f"in [{lo:g}, {hi:g}]")
    return rois


def _validate_encoder(op: str, ref: Tensor, B: int, T: int, C: int, timestamps, table, values: bool) -> None:
    if timestamps is None:
        if table is not None:
            raise ValueError(f"{op}: a TPE table needs timestamps (the row of each frame)")
        return
    if not isinstance(timestamps, Tensor) or tuple(timestamps.shape) != (B, T):
        raise ValueError(f"{op}: timestamps must be [B, T] = [{B}, {T}], got {_shape(timestamps)}")
    if timestamps.device != ref.device:
        raise ValueError(f"{op}: timestamps must be on the features' device {ref.device}, got {timestamps.device}")
    if table is not None:
        if not isinstance(table, Tensor) or table.dim() != 2 or table.shape[1] != C:
            raise ValueError(f"{op}: table must be [L, C] with C = {C} (the channels), got {_shape(table)}")
        _check_float_on(op, table, "table", ref)
        if timestamps.is_floating_point() or timestamps.dtype == torch.bool or timestamps.is_complex():
            raise TypeError(f"{op}: with a table, timestamps must be integer frame indices into it, got "
                            f"{timestamps.dtype}")
        if values and timestamps.numel() > 0:
            lo, hi = (int(v) for v in torch.aminmax(timestamps))
            if lo < 0 or hi >= table.shape[0]:
                raise IndexError(f"{op}: timestamps must index rows of table in [0, {table.shape[0]}), got values in "
                                 f"[{lo}, {hi}]")
    else:
        if not timestamps.is_floating_point():
            raise TypeError(f"{op}: without a table, timestamps must be float seconds (the sinusoidal TPE), got "
                            f"{timestamps.dtype}")
        if values and timestamps.numel() > 0 and not bool(torch.isfinite(timestamps).all()):
            raise ValueError(f"{op}: timestamps must be finite seconds, got non-finite values (nan/inf)")


def _validate_region_pool(features, boxes, output_size, sampling_ratio, valid, timestamps, table, values: bool):
    op = "region_pool"
    _check_features(op, features, "features", 5, "[B, T, C, H, W] (or [B, T, H, W, C] with channels_last=True)")
    _check_output_size(op, output_size)
    if not isinstance(sampling_ratio, int):
        raise TypeError(f"{op}: sampling_ratio must be an int (<= 0: adaptive), got {sampling_ratio!r}")
    B, T, C = features.shape[:3]
    if not isinstance(boxes, Tensor) or boxes.dim() != 4 or tuple(boxes.shape[:2]) != (B, T) or boxes.shape[3] != 4:
        raise ValueError(f"{op}: boxes must be [B, T, R, 4] = [{B}, {T}, R, 4] (x1, y1, x2, y2 per frame and region), "
                         f"got {_shape(boxes)}")
    _check_float_on(op, boxes, "boxes", features)
    if valid is not None:
        R = boxes.shape[2]
        if not isinstance(valid, Tensor) or tuple(valid.shape) != (B, T, R):
            raise ValueError(f"{op}: valid must be [B, T, R] = [{B}, {T}, {R}], got {_shape(valid)}")
        if valid.dtype != torch.bool:
            raise TypeError(f"{op}: valid must be a bool tensor, got {valid.dtype}")
        if valid.device != features.device:
            raise ValueError(f"{op}: valid must be on the features' device {features.device}, got {valid.device}")
    _validate_encoder(op, features, B, T, C, timestamps, table, values)


def _validate_mask_pool(features, masks, eps, timestamps, table, values: bool):
    op = "mask_pool"
    _check_features(op, features, "features", 5, "[B, T, C, H, W] (or [B, T, H, W, C] with channels_last=True)")
    B, T, C, H, W = features.shape
    if not isinstance(masks, Tensor) or masks.dim() != 5:
        raise ValueError(f"{op}: masks must be [B, T, R, Hm, Wm] (one soft mask per frame and region), got "
                         f"{_shape(masks)}")
    if tuple(masks.shape[:2]) != (B, T):
        raise ValueError(f"{op}: masks must be [B, T, R, Hm, Wm] with B, T = {B}, {T}, got {tuple(masks.shape)}")
    if masks.shape[3] == 0 or masks.shape[4] == 0 or H == 0 or W == 0:
        raise ValueError(f"{op}: masks and features need non-empty grids, got masks {tuple(masks.shape[3:])} and "
                         f"features {(H, W)}")
    if masks.is_complex():
        raise TypeError(f"{op}: masks must be real, got {masks.dtype}")
    if masks.device != features.device:
        raise ValueError(f"{op}: masks must be on the features' device {features.device}, got {masks.device}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    _validate_encoder(op, features, B, T, C, timestamps, table, values)


# ---------------------------------------------------------------------------------------------
# Declaration: schemas, fake functions, autograd (csrc/regional/ and kernels/regional.py implement them)
# ---------------------------------------------------------------------------------------------


def _is_channels_last(t: Tensor) -> bool:
    """True when t ([..., C, H, W]) stores each pixel's channels contiguously and is not plain contiguous."""
    d = t.dim()
    perm = list(range(d - 3)) + [d - 2, d - 1, d - 3]
    return t.shape[d - 3] > 1 and not t.is_contiguous() and t.permute(perm).is_contiguous()


def _new_grad(ref: Tensor, sizes, channels_last: bool, dtype=None) -> Tensor:
    """An empty [..., C, H, W] tensor, contiguous or channels-last (the layout the kernels return)."""
    dtype = dtype or ref.dtype
    if not channels_last:
        return ref.new_empty(sizes, dtype=dtype)
    d = len(sizes)
    cl = list(sizes[:d - 3]) + [sizes[d - 2], sizes[d - 1], sizes[d - 3]]
    back = list(range(d - 3)) + [d - 1, d - 3, d - 2]
    return ref.new_empty(cl, dtype=dtype).permute(back)


def _fake_roi_align(input, rois, spatial_scale, ph, pw, sampling_ratio, aligned):
    return input.new_empty((rois.shape[0], input.shape[1], ph, pw))


def _fake_roi_align_backward(grad, rois, spatial_scale, ph, pw, sampling_ratio, aligned, N, H, W, channels_last,
                             deterministic):
    return _new_grad(grad, (N, grad.shape[1], H, W), channels_last)


def _fake_region_pool(features, boxes, valid, timestamps, table, spatial_scale, ph, pw, sampling_ratio, aligned, base):
    B, T, C = features.shape[:3]
    return features.new_empty((B, T, boxes.shape[2], C, ph, pw))


def _fake_region_pool_backward(grad, boxes, valid, spatial_scale, ph, pw, sampling_ratio, aligned, H, W,
                               channels_last, deterministic):
    B, T, R, C = grad.shape[:4]
    return _new_grad(grad, (B, T, C, H, W), channels_last)


def _fake_mask_pool(features, masks, timestamps, table, eps, base):
    B, T, C, H, W = features.shape
    R = masks.shape[2]
    acc = acc_dtype(features.dtype)
    return (features.new_empty((B, T, R, C)), features.new_empty((B, T, R, H, W), dtype=acc),
            features.new_empty((B, T, R), dtype=acc))


def _fake_mask_pool_backward(grad, features, masks, resized, inv_z, need_features_grad, need_masks_grad,
                             channels_last):
    gf = _new_grad(features, tuple(features.shape), channels_last) if need_features_grad else features.new_empty((0,))
    gm = masks.new_empty(masks.shape) if need_masks_grad else masks.new_empty((0,))
    return gf, gm


def _table_grad(ctx, grad_tokens: Tensor, timestamps: Tensor) -> Tensor:
    det = torch.are_deterministic_algorithms_enabled()
    return ctx.ops.tpe_table_backward(grad_tokens, timestamps, ctx.num_rows, det).to(ctx.table_dtype)


def _setup_roi_align(ctx, inputs, output):
    input, rois, spatial_scale, ph, pw, sampling_ratio, aligned = inputs
    ctx.args = (spatial_scale, ph, pw, sampling_ratio, aligned)
    ctx.shape = (input.shape[0], input.shape[2], input.shape[3], _is_channels_last(input))
    ctx.save_for_backward(rois)


def _roi_align_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    N, H, W, cl = ctx.shape
    grad_input = None
    if ctx.needs_input_grad[0]:
        det = torch.are_deterministic_algorithms_enabled()
        grad_input = ctx.ops.roi_align_backward(grad, rois, *ctx.args, N, H, W, cl, det)
    return grad_input, None, None, None, None, None, None


def _setup_region_pool(ctx, inputs, output):
    features, boxes, valid, timestamps, table, spatial_scale, ph, pw, sampling_ratio, aligned, base = inputs
    ctx.args = (spatial_scale, ph, pw, sampling_ratio, aligned)
    ctx.shape = (features.shape[3], features.shape[4], _is_channels_last(features))
    ctx.num_rows = 0 if table is None else table.shape[0]
    ctx.table_dtype = None if table is None else table.dtype
    ctx.save_for_backward(boxes, valid, timestamps if table is not None else None)


def _region_pool_backward(ctx, grad):
    boxes, valid, timestamps = ctx.saved_tensors
    H, W, cl = ctx.shape
    grad_features = grad_table = None
    if ctx.needs_input_grad[0]:
        det = torch.are_deterministic_algorithms_enabled()
        grad_features = ctx.ops.region_pool_backward(grad, boxes, valid, *ctx.args, H, W, cl, det)
    if ctx.needs_input_grad[4]:
        g = grad.sum(dim=(4, 5))  # the TPE is added to every output cell: [B, T, R, C]
        if valid is not None:
            g = torch.where(valid.unsqueeze(-1), g, torch.zeros_like(g))
        grad_table = _table_grad(ctx, g, timestamps)
    return grad_features, None, None, None, grad_table, None, None, None, None, None, None


def _setup_mask_pool(ctx, inputs, output):
    features, masks, timestamps, table, eps, base = inputs
    _, resized, inv_z = output  # the masks on the feature grid and 1 / (sum + eps): the backward reuses them
    ctx.mark_non_differentiable(resized, inv_z)
    ctx.set_materialize_grads(False)
    ctx.cl = _is_channels_last(features)
    ctx.num_rows = 0 if table is None else table.shape[0]
    ctx.table_dtype = None if table is None else table.dtype
    ctx.save_for_backward(features, masks, resized, inv_z, timestamps if table is not None else None)


def _mask_pool_backward(ctx, grad, _grad_resized=None, _grad_inv_z=None):
    features, masks, resized, inv_z, timestamps = ctx.saved_tensors
    need_f, need_m, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    grad_features = grad_masks = grad_table = None
    if grad is None:  # only the non-differentiable outputs were used
        return None, None, None, None, None, None
    if need_f or need_m:
        gf, gm = ctx.ops.mask_pool_backward(grad, features, masks, resized, inv_z, need_f, need_m, ctx.cl)
        grad_features = gf if need_f else None
        grad_masks = gm if need_m else None
    if need_t:
        grad_table = _table_grad(ctx, grad, timestamps)
    return grad_features, grad_masks, None, grad_table, None, None


REGIONAL = Family("regional")
ROI_ALIGN = REGIONAL.op(
    "roi_align", "(Tensor input, Tensor rois, float spatial_scale, int ph, int pw, int sampling_ratio, bool aligned) "
    "-> Tensor", fake=_fake_roi_align, triton=lambda K, *a: K.roi_align_fwd(*a),
    autograd=(_setup_roi_align, _roi_align_backward))
REGIONAL.op("roi_align_backward", "(Tensor grad, Tensor rois, float spatial_scale, int ph, int pw, int sampling_ratio, "
            "bool aligned, int N, int H, int W, bool channels_last, bool deterministic) -> Tensor",
            fake=_fake_roi_align_backward, triton=lambda K, *a: K.roi_align_bwd(*a))
REGION_POOL = REGIONAL.op(
    "region_pool", "(Tensor features, Tensor boxes, Tensor? valid, Tensor? timestamps, Tensor? table, "
    "float spatial_scale, int ph, int pw, int sampling_ratio, bool aligned, float base) -> Tensor",
    fake=_fake_region_pool, triton=lambda K, *a: K.region_pool_fwd(*a),
    autograd=(_setup_region_pool, _region_pool_backward))
REGIONAL.op("region_pool_backward", "(Tensor grad, Tensor boxes, Tensor? valid, float spatial_scale, int ph, int pw, "
            "int sampling_ratio, bool aligned, int H, int W, bool channels_last, bool deterministic) -> Tensor",
            fake=_fake_region_pool_backward, triton=lambda K, *a: K.region_pool_bwd(*a))
MASK_POOL = REGIONAL.op(
    "mask_pool", "(Tensor features, Tensor masks, Tensor? timestamps, Tensor? table, float eps, float base) -> "
    "(Tensor, Tensor, Tensor)", fake=_fake_mask_pool, triton=lambda K, *a: K.mask_pool_fwd(*a),
    autograd=(_setup_mask_pool, _mask_pool_backward))
REGIONAL.op("mask_pool_backward", "(Tensor grad, Tensor features, Tensor masks, Tensor resized, Tensor inv_z, "
            "bool need_features_grad, bool need_masks_grad, bool channels_last) -> (Tensor, Tensor)",
            fake=_fake_mask_pool_backward, triton=lambda K, *a: K.mask_pool_bwd(*a))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_boxes_shape(boxes: Union[Tensor, List[Tensor]]) -> None:
    # torchvision's contract (ops/_utils.py check_roi_boxes_shape): a bad box shape is an
    # AssertionError (torch._assert), which detection code written for torchvision expects.
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            torch._assert(isinstance(b, torch.Tensor) and b.dim() == 2 and b.size(1) == 4,
                          "roi_align: boxes as a list must hold one Tensor[L, 4] (x1, y1, x2, y2) per image; boxes[{}] "
                          "is not one (shape {})".format(i, list(b.shape) if isinstance(b, torch.Tensor) else "-"))
    elif isinstance(boxes, torch.Tensor):
        torch._assert(boxes.dim() == 2 and boxes.size(1) == 5,
                      "roi_align: boxes must be a Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of "
                      "Tensor[L, 4], got shape {}".format(list(boxes.shape)))
    else:
        torch._assert(False, "roi_align: boxes must be a Tensor[K, 5] or a list of Tensor[L, 4]")


@torch.fx.wrap
def roi_align(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size: BroadcastingList2[int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
              backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """RoIAlign: a drop-in for torchvision.ops.roi_align (same arguments, defaults, numbers and
    exception types; a leaf under torch.fx; scriptable with torch.jit.script).

    Args:
        input: [N, C, H, W] features (contiguous or channels_last; fp32, bf16, fp16, fp64), or a
            per-tensor quantized tensor (boxes then quantized too; computed in float from the
            dequantized values and quantized with input's scale and zero point).
        boxes: Tensor[K, 5] (batch index, x1, y1, x2, y2), or a list of Tensor[L, 4] per image.
            Another shape raises AssertionError, as torchvision.
        output_size: int or (ph, pw).
        spatial_scale: scale from box coordinates to input coordinates.
        sampling_ratio: samples per bin along each axis; <= 0: ceil(bin size) (adaptive).
        aligned: shift the box by -0.5 pixel (pixel centres at integer + 0.5).
        backend: "eager" | "cpu" | "triton" | "cuda" | None (automatic).
        validate: check shapes, dtypes, devices and the batch-index range (reads the boxes: a device
            sync on GPU). False skips them; the CPU kernel still rejects bad indices.

    Returns [K, C, ph, pw] in input's dtype (fp32 accumulation). Gradient: to input (in input's
    memory format), deterministic on CPU and, under torch.use_deterministic_algorithms(True), on GPU.
    Non-finite box coordinates give zeros (see the module docstring).

    Under torch.jit.script the box-shape check runs in TorchScript and the op is called through
    Python (torch.jit.ignore: the backend choice and the kernels' autograd are Python), so a scripted
    model using it runs in a Python process but cannot be saved with torch.jit.save and run without
    Python; torchvision's can.
    """
    _check_boxes_shape(boxes)
    return _roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, backend, validate)


@torch.jit.ignore
def _roi_align(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size: List[int], spatial_scale: float,
               sampling_ratio: int, aligned: bool, backend: Optional[str], validate: bool) -> Tensor:
    if isinstance(input, Tensor) and input.is_quantized:
        return _roi_align_quantized(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, backend)
    if validate:
        rois = _validate_roi_align(input, boxes, output_size, sampling_ratio, check_values())
    else:
        rois = boxes if isinstance(boxes, Tensor) else boxes_to_rois(boxes).to(input.device)
    ph, pw = _pair(output_size)
    be = ROI_ALIGN.select(input.device, backend)
    if be == "eager":
        return roi_align_eager(input, rois, (ph, pw), spatial_scale, sampling_ratio, aligned)
    return ROI_ALIGN(be, input, rois, float(spatial_scale), ph, pw, int(sampling_ratio), bool(aligned))


def _roi_align_quantized(input: Tensor, boxes, output_size, spatial_scale, sampling_ratio, aligned, backend) -> Tensor:
    """Quantized RoIAlign as torchvision's: the float op on the dequantized input and boxes, the result
    quantized with input's scale and zero point (torchvision's qroi_align also takes one image per
    batch only; this takes any N)."""
    if input.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        raise NotImplementedError(f"roi_align: quantized input must be quantized per tensor, got {input.qscheme()}")
    parts = list(boxes) if isinstance(boxes, (list, tuple)) else [boxes]
    if not all(b.is_quantized for b in parts):
        raise ValueError("roi_align: if input is quantized, boxes must also be quantized (as torchvision)")
    deq = [b.dequantize() for b in parts]
    out = roi_align(input.dequantize(), deq if isinstance(boxes, (list, tuple)) else deq[0], output_size, spatial_scale,
                    sampling_ratio, aligned, backend)
    return torch.quantize_per_tensor(out, input.q_scale(), input.q_zero_point(), input.dtype)


def region_pool(features: Tensor, boxes: Tensor, *, output_size=(1, 1), spatial_scale: float = 1.0,
                sampling_ratio: int = -1, aligned: bool = True, valid: Optional[Tensor] = None,
                timestamps: Optional[Tensor] = None, table: Optional[Tensor] = None, base: float = 10000.0,
                channels_last: bool = False, backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """RoIAlign of each frame's region boxes, with the TPE fused in: region tokens for 4D-RGPT.

    Args:
        features: [B, T, C, H, W] (any strides: a channels-last layout is read in place), or
            [B, T, H, W, C] with channels_last=True (e.g. vision tokens [B, T, h*w, C] viewed as a grid).
        boxes: [B, T, R, 4] (x1, y1, x2, y2) per frame and region, in box coordinates.
        output_size: (ph, pw); (1, 1) returns [B, T, R, C], else [B, T, R, C, ph, pw].
        spatial_scale, sampling_ratio, aligned: as roi_align (aligned defaults to True here).
        valid: optional bool [B, T, R]; an absent region gives a zero token (no TPE) and no gradient.
        timestamps, table, base: the TPE of tpe_add, added to every valid token: [B, T] float
            seconds (sinusoidal), or [B, T] integer rows of table [L, C] (learned).
        backend, validate: as roi_align.

    Gradients: features, and table (the region tokens' gradient summed into each frame's row).
    """
    if channels_last:
        if not isinstance(features, Tensor) or features.dim() != 5:
            raise ValueError(f"region_pool: with channels_last=True, features must be [B, T, H, W, C], got "
                             f"{_shape(features)}")
        features = _cl_to_bt_chw(features)
    if validate:
        _validate_region_pool(features, boxes, output_size, sampling_ratio, valid, timestamps, table,
                              check_values())
    ph, pw = _pair(output_size)
    be = REGION_POOL.select(features.device, backend)
    if be == "eager":
        return region_pool_eager(features, boxes, output_size=(ph, pw), spatial_scale=spatial_scale,
                                 sampling_ratio=sampling_ratio, aligned=aligned, valid=valid, timestamps=timestamps,
                                 table=table, base=base)
    out = REGION_POOL(be, features, boxes, valid, timestamps, table, float(spatial_scale), ph, pw,
                                 int(sampling_ratio), bool(aligned), float(base))
    return out.view(out.shape[:4]) if (ph, pw) == (1, 1) else out


def mask_pool(features: Tensor, masks: Tensor, *, eps: float = 1e-8, timestamps: Optional[Tensor] = None,
              table: Optional[Tensor] = None, base: float = 10000.0, channels_last: bool = False,
              backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """Soft masked average per region and frame (SpatialRGPT's mask pooling), TPE fused in.

    Args:
        features: [B, T, C, H, W] (any strides), or [B, T, H, W, C] with channels_last=True.
        masks: [B, T, R, Hm, Wm] soft masks at any resolution (bool/integer masks are converted);
            resized to H x W inside the op exactly as F.interpolate(mode="bilinear", align_corners=False).
        eps: out = sum(f * m) / (sum(m) + eps).
        timestamps, table, base: the fused TPE, as region_pool.

    Returns [B, T, R, C]. Gradients: features, masks (when they require it), table. The compiled and
    Triton ops also return the resized masks and 1 / (sum + eps) (saved for the backward, which then
    does not resize the masks again); this function returns the pooled tokens only.
    """
    if channels_last:
        if not isinstance(features, Tensor) or features.dim() != 5:
            raise ValueError(f"mask_pool: with channels_last=True, features must be [B, T, H, W, C], got "
                             f"{_shape(features)}")
        features = _cl_to_bt_chw(features)
    if validate:
        _validate_mask_pool(features, masks, eps, timestamps, table, check_values())
    if not masks.is_floating_point():
        masks = masks.to(features.dtype)
    be = MASK_POOL.select(features.device, backend)
    if be == "eager":
        return mask_pool_eager(features, masks, eps=eps, timestamps=timestamps, table=table, base=base)
    # outputs [1:] are saved for the backward
    return MASK_POOL(be, features, masks, timestamps, table, float(eps), float(base))[0]


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class RoIAlign(nn.Module):
    """torchvision.ops.RoIAlign on rgpt4d's roi_align (same constructor, forward and repr; scriptable)."""

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio, self.aligned, self.backend = sampling_ratio, aligned, backend

    def forward(self, input: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned,
                         self.backend)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


class RegionPool(nn.Module):
    """region_pool as a module (no parameters: pass a TPE table to forward, or use RegionalEncoder4D)."""

    def __init__(self, output_size=(1, 1), spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = True,
                 channels_last: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.output_size, self.spatial_scale, self.sampling_ratio = _pair(output_size), spatial_scale, sampling_ratio
        self.aligned, self.channels_last, self.backend = aligned, channels_last, backend

    def forward(self, features: Tensor, boxes: Tensor, valid: Optional[Tensor] = None,
                timestamps: Optional[Tensor] = None, table: Optional[Tensor] = None) -> Tensor:
        return region_pool(features, boxes, output_size=self.output_size, spatial_scale=self.spatial_scale,
                           sampling_ratio=self.sampling_ratio, aligned=self.aligned, valid=valid,
                           timestamps=timestamps, table=table, channels_last=self.channels_last, backend=self.backend)


class MaskPool(nn.Module):
    """mask_pool as a module."""

    def __init__(self, eps: float = 1e-8, channels_last: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.eps, self.channels_last, self.backend = eps, channels_last, backend

    def forward(self, features: Tensor, masks: Tensor, timestamps: Optional[Tensor] = None,
                table: Optional[Tensor] = None) -> Tensor:
        return mask_pool(features, masks, eps=self.eps, timestamps=timestamps, table=table,
                         channels_last=self.channels_last, backend=self.backend)
