"""Triton kernels for regional pooling. Imports only torch, triton, _common.py and the TPE helpers of
tpe.py.

    roi_align_fwd / roi_align_bwd
        torchvision's RoIAlign: RoI (x1, y1, x2, y2) * spatial_scale (- 0.5 if aligned; else at least
        1x1), ph x pw bins, each the mean of grid_h x grid_w bilinear samples (sampling_ratio, or
        ceil(bin size) if <= 0); a sample more than one pixel outside the map contributes 0.
    region_pool_fwd / region_pool_bwd
        the same pooling over the frames of [B, T, C, H, W] features, boxes [B, T, R, 4], an optional
        valid mask [B, T, R] (absent -> zero token), and the frame's TPE (tpe.py's encoding) added.
    mask_pool_fwd / mask_pool_bwd
        masks [B, T, R, Hm, Wm] resized bilinearly (align_corners=False) to the H x W grid,
        out = sum(f * m) / (sum(m) + eps) (+ TPE). The forward also returns the resized masks and
        1 / (sum + eps), which the backward takes instead of resizing the masks again.

Features are read through their strides (any layout, no copy). Arithmetic in the accumulation dtype
of _common.py (fp32; fp64 for fp64 inputs: float arguments are annotated tl.float64 and cast in the
kernel by _common.acc_scalar, since the compiler types an unannotated Python float fp32). Backward: float
atomics by default; with deterministic=True every bilinear tap becomes an entry (target pixel,
gradient row, weight), the entries are sorted by target pixel (stable sort: a fixed order) and one
program per pixel tile x channel block sums each pixel's entries in that order (no atomics, bitwise
repeatable, the whole GPU busy). Non-finite box coordinates: the RoI samples nothing (zeros). Every
launch runs under its tensors' device (torch.cuda.device_of). Set TRITON_INTERPRET=1 before importing
this file to run the kernels on CPU tensors.
"""

import math

import torch
import triton
import triton.language as tl

try:  # installed as rgpt4d.kernels
    from ._common import acc_scalar, acc_types
    from .tpe import encoder_inputs, frame_encoding
except ImportError:  # copied next to _common.py and tpe.py as top-level modules
    from _common import acc_scalar, acc_types
    from tpe import encoder_inputs, frame_encoding


# ---- host scalars, RoI geometry and bilinear taps --------------------------------------------

@triton.jit
def _roi_geometry(boxes_ptr, k, ok, spatial_scale, ph, pw, sampling_ratio, ALIGNED: tl.constexpr, ACC: tl.constexpr):
    """(y0, x0, bin_h, bin_w, grid_h, grid_w, 1/count) of RoI k; grid 0 when not ok or non-finite."""
    bx1 = tl.load(boxes_ptr + 4 * k + 0, mask=ok, other=0.0).to(ACC)
    by1 = tl.load(boxes_ptr + 4 * k + 1, mask=ok, other=0.0).to(ACC)
    bx2 = tl.load(boxes_ptr + 4 * k + 2, mask=ok, other=0.0).to(ACC)
    by2 = tl.load(boxes_ptr + 4 * k + 3, mask=ok, other=0.0).to(ACC)
    spatial_scale = acc_scalar(spatial_scale, ACC)
    offset = 0.5 if ALIGNED else 0.0
    x0 = bx1 * spatial_scale - offset
    y0 = by1 * spatial_scale - offset
    x1 = bx2 * spatial_scale - offset
    y1 = by2 * spatial_scale - offset
    roi_w = x1 - x0
    roi_h = y1 - y0
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    finite = ((x0 - x0) == 0) & ((y0 - y0) == 0) & ((x1 - x1) == 0) & ((y1 - y1) == 0) & ok
    bin_h = roi_h / ph
    bin_w = roi_w / pw
    # adaptive grid: ceil(bin size), clamped before the integer conversion (nan/inf/huge boxes)
    ah = tl.minimum(tl.maximum(tl.ceil(tl.where(finite, bin_h, 0.0)), 0.0), 1073741824.0).to(tl.int32)
    aw = tl.minimum(tl.maximum(tl.ceil(tl.where(finite, bin_w, 0.0)), 0.0), 1073741824.0).to(tl.int32)
    grid_h = tl.where(finite, tl.where(sampling_ratio > 0, sampling_ratio, ah), 0)
    grid_w = tl.where(finite, tl.where(sampling_ratio > 0, sampling_ratio, aw), 0)
    inv_count = 1.0 / tl.maximum(grid_h.to(ACC) * grid_w.to(ACC), 1.0)
    y0 = tl.where(finite, y0, 0.0)
    x0 = tl.where(finite, x0, 0.0)
    bin_h = tl.where(finite, bin_h, 0.0)
    bin_w = tl.where(finite, bin_w, 0.0)
    return y0, x0, bin_h, bin_w, grid_h, grid_w, inv_count


@triton.jit
def _axis_tap(v, size, size_f):
    """Bilinear taps of coordinate(s) v on an axis of `size` pixels: (lo, hi, w_lo, w_hi, inside)."""
    inside = (v >= -1.0) & (v <= size_f)
    vc = tl.where(inside, tl.maximum(v, 0.0), 0.0)
    lo = vc.to(tl.int64)  # vc >= 0: truncation is floor
    edge = lo >= size - 1
    lo = tl.maximum(tl.where(edge, size - 1, lo), 0)
    hi = tl.where(edge, lo, lo + 1)
    frac = tl.where(edge, 0.0, vc - lo.to(vc.dtype))
    return lo, hi, 1.0 - frac, frac, inside


@triton.jit
def _image_base(img, IMG_INNER, s_outer, s_inner):
    img = tl.maximum(img, 0)
    return (img // IMG_INNER) * s_outer + (img % IMG_INNER) * s_inner


# ---- RoI pooling: forward ----------------------------------------------------------------------

@triton.jit
def _sample_taps(y0, x0, bin_h, bin_w, gh, gw, cell_i, cell_j, s, H, W, Hf, Wf):
    """Taps of samples s (flat iy * gw + ix) of every bin: [bins, samples] each."""
    gw1 = tl.maximum(gw, 1)
    iy = s // gw1
    ix = s % gw1
    y = y0 + cell_i[:, None] * bin_h + (iy[None, :] + 0.5) * bin_h / gh
    x = x0 + cell_j[:, None] * bin_w + (ix[None, :] + 0.5) * bin_w / gw
    ylo, yhi, wyl, wyh, yin = _axis_tap(y, H, Hf)
    xlo, xhi, wxl, wxh, xin = _axis_tap(x, W, Wf)
    return ylo, yhi, wyl, wyh, xlo, xhi, wxl, wxh, yin & xin


@triton.jit(do_not_specialize=["H", "W"])  # sizes of 1 would become constexprs
def _roi_pool_fwd_kernel(feat_ptr, boxes_ptr, img_ptr, ts_ptr, table_ptr, out_ptr,
                         C, H, W, IMG_INNER, s_outer, s_inner, sC, sH, sW,
                         spatial_scale: tl.float64, ph, pw, sampling_ratio, log_base: tl.float64,
                         ALIGNED: tl.constexpr, HAS_ENC: tl.constexpr, HAS_TABLE: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    # program = (RoI k, channel block); tile = [bins, samples, channels], BLOCK_S samples of every
    # bin at a time, summed over the sample axis.
    k = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    P = ph * pw
    offs_p = tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    cell_i = (offs_p // pw).to(ACC)
    cell_j = (offs_p % pw).to(ACC)
    img = tl.load(img_ptr + k)
    ok = img >= 0
    y0, x0, bin_h, bin_w, gh, gw, inv_count = _roi_geometry(boxes_ptr, k, ok, spatial_scale, ph, pw,
                                                            sampling_ratio, ALIGNED, ACC)
    base = feat_ptr + _image_base(img, IMG_INNER, s_outer, s_inner) + (offs_c * sC)[None, None, :]
    Hf = H.to(ACC)
    Wf = W.to(ACC)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    ns = gh * gw
    for s0 in range(0, ns, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ylo, yhi, wyl, wyh, xlo, xhi, wxl, wxh, inside = _sample_taps(y0, x0, bin_h, bin_w, gh, gw, cell_i, cell_j, s,
                                                                      H, W, Hf, Wf)
        m = (inside & pmask[:, None] & (s < ns)[None, :])[:, :, None] & cmask[None, None, :]
        v = (wyl * wxl)[:, :, None] * tl.load(base + (ylo * sH + xlo * sW)[:, :, None], mask=m, other=0.0).to(ACC)
        v += (wyl * wxh)[:, :, None] * tl.load(base + (ylo * sH + xhi * sW)[:, :, None], mask=m, other=0.0).to(ACC)
        v += (wyh * wxl)[:, :, None] * tl.load(base + (yhi * sH + xlo * sW)[:, :, None], mask=m, other=0.0).to(ACC)
        v += (wyh * wxh)[:, :, None] * tl.load(base + (yhi * sH + xhi * sW)[:, :, None], mask=m, other=0.0).to(ACC)
        acc += tl.sum(v, axis=1)
    acc = acc * inv_count
    if HAS_ENC:
        enc = frame_encoding(ts_ptr, table_ptr, tl.maximum(img, 0), offs_c, cmask, C, acc_scalar(log_base, ACC),
                              HAS_TABLE, ACC)
        acc += tl.where(ok, enc, 0.0)[None, :]
    omask = pmask[:, None] & cmask[None, :]
    tl.store(out_ptr + (k * C + offs_c[None, :]) * P + offs_p[:, None], acc.to(out_ptr.dtype.element_ty), mask=omask)


# ---- RoI pooling: backward ---------------------------------------------------------------------

@triton.jit(do_not_specialize=["H", "W"])  # sizes of 1 would become constexprs
def _roi_pool_bwd_atomic_kernel(grad_ptr, boxes_ptr, img_ptr, gbuf_ptr,
                                C, H, W, IMG_INNER, s_outer, s_inner, sC, sH, sW,
                                spatial_scale: tl.float64, ph, pw, sampling_ratio,
                                ALIGNED: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                                BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    P = ph * pw
    offs_p = tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    cell_i = (offs_p // pw).to(ACC)
    cell_j = (offs_p % pw).to(ACC)
    img = tl.load(img_ptr + k)
    ok = img >= 0
    y0, x0, bin_h, bin_w, gh, gw, inv_count = _roi_geometry(boxes_ptr, k, ok, spatial_scale, ph, pw,
                                                            sampling_ratio, ALIGNED, ACC)
    g = tl.load(grad_ptr + (k * C + offs_c[None, :]) * P + offs_p[:, None],
                mask=pmask[:, None] & cmask[None, :], other=0.0).to(ACC) * inv_count
    g = g[:, None, :]
    base = gbuf_ptr + _image_base(img, IMG_INNER, s_outer, s_inner) + (offs_c * sC)[None, None, :]
    Hf = H.to(ACC)
    Wf = W.to(ACC)
    ns = gh * gw
    for s0 in range(0, ns, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ylo, yhi, wyl, wyh, xlo, xhi, wxl, wxh, inside = _sample_taps(y0, x0, bin_h, bin_w, gh, gw, cell_i, cell_j, s,
                                                                      H, W, Hf, Wf)
        m = (inside & pmask[:, None] & (s < ns)[None, :])[:, :, None] & cmask[None, None, :]
        tl.atomic_add(base + (ylo * sH + xlo * sW)[:, :, None], (wyl * wxl)[:, :, None] * g, mask=m)
        tl.atomic_add(base + (ylo * sH + xhi * sW)[:, :, None], (wyl * wxh)[:, :, None] * g, mask=m)
        tl.atomic_add(base + (yhi * sH + xlo * sW)[:, :, None], (wyh * wxl)[:, :, None] * g, mask=m)
        tl.atomic_add(base + (yhi * sH + xhi * sW)[:, :, None], (wyh * wxh)[:, :, None] * g, mask=m)


# Deterministic backward: (1) samples per RoI, (2) entries, (3) a stable sort by target pixel on the
# host side, (4) segmented sums. Sample s of a RoI is bin q = s // (gh * gw), then sample row, then
# sample column; its taps are entries 4 s .. 4 s + 3 (lo/lo, lo/hi, hi/lo, hi/hi), numbered from the
# pass's first sample. An entry is (key = image * H * W + y * W + x, or NPIX when the sample lies
# outside; row of the transposed gradient k * P + q; weight wy * wx / count).

@triton.jit
def _roi_sample_counts_kernel(boxes_ptr, img_ptr, cnt_ptr, K, spatial_scale: tl.float64, ph, pw, sampling_ratio,
                              ALIGNED: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    km = k < K
    img = tl.load(img_ptr + k, mask=km, other=-1)
    _, _, _, _, gh, gw, _ = _roi_geometry(boxes_ptr, k, km & (img >= 0), spatial_scale, ph, pw, sampling_ratio,
                                          ALIGNED, ACC)
    tl.store(cnt_ptr + k, gh.to(tl.int64) * gw.to(tl.int64) * (ph * pw), mask=km)


@triton.jit(do_not_specialize=["H", "W"])  # sizes of 1 would become constexprs
def _roi_entries_kernel(boxes_ptr, img_ptr, first_ptr, key_ptr, row_ptr, w_ptr, s_lo, s_hi, NPIX, H, W,
                        spatial_scale: tl.float64, ph, pw, sampling_ratio,
                        ALIGNED: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    # program = RoI k: the entries of its samples that fall in the pass's sample range [s_lo, s_hi).
    k = tl.program_id(0).to(tl.int64)
    img = tl.load(img_ptr + k)
    y0, x0, bin_h, bin_w, gh, gw, inv_count = _roi_geometry(boxes_ptr, k, img >= 0, spatial_scale, ph, pw,
                                                            sampling_ratio, ALIGNED, ACC)
    gh = gh.to(tl.int64)
    gw = gw.to(tl.int64)
    ng = tl.maximum(gh * gw, 1)
    first = tl.load(first_ptr + k)
    a = tl.maximum(first, s_lo) - first
    b = tl.minimum(first + gh * gw * (ph * pw), s_hi) - first
    Hf = H.to(ACC)
    Wf = W.to(ACC)
    pix = tl.maximum(img, 0) * H * W
    for t0 in range(a, b, BLOCK_S):
        s = t0 + tl.arange(0, BLOCK_S)
        sm = s < b
        q = s // ng
        r = s - q * ng
        iy = r // gw
        ix = r - iy * gw
        y = y0 + (q // pw).to(ACC) * bin_h + (iy.to(ACC) + 0.5) * bin_h / gh.to(ACC)
        x = x0 + (q % pw).to(ACC) * bin_w + (ix.to(ACC) + 0.5) * bin_w / gw.to(ACC)
        ylo, yhi, wyl, wyh, yin = _axis_tap(y, H, Hf)
        xlo, xhi, wxl, wxh, xin = _axis_tap(x, W, Wf)
        valid = yin & xin
        scale = tl.where(valid, inv_count, 0.0)  # outside: weight 0 too (key NPIX: never summed)
        e = 4 * (first + s - s_lo)
        row = k * (ph * pw) + q
        tl.store(key_ptr + e, tl.where(valid, pix + ylo * W + xlo, NPIX), mask=sm)
        tl.store(key_ptr + e + 1, tl.where(valid, pix + ylo * W + xhi, NPIX), mask=sm)
        tl.store(key_ptr + e + 2, tl.where(valid, pix + yhi * W + xlo, NPIX), mask=sm)
        tl.store(key_ptr + e + 3, tl.where(valid, pix + yhi * W + xhi, NPIX), mask=sm)
        tl.store(row_ptr + e, row, mask=sm)
        tl.store(row_ptr + e + 1, row, mask=sm)
        tl.store(row_ptr + e + 2, row, mask=sm)
        tl.store(row_ptr + e + 3, row, mask=sm)
        tl.store(w_ptr + e, wyl * wxl * scale, mask=sm)
        tl.store(w_ptr + e + 1, wyl * wxh * scale, mask=sm)
        tl.store(w_ptr + e + 2, wyh * wxl * scale, mask=sm)
        tl.store(w_ptr + e + 3, wyh * wxh * scale, mask=sm)


@triton.jit(do_not_specialize=["H", "W"])  # sizes of 1 would become constexprs
def _roi_segment_sum_kernel(start_ptr, row_ptr, w_ptr, gt_ptr, out_ptr, NPIX, C, H, W, IMG_INNER, s_outer, s_inner,
                            sC, sH, sW, ACCUMULATE: tl.constexpr, ACC: tl.constexpr, BLOCK_X: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    # program = (pixel tile, channel block): the only writer of that slice of the gradient. Pixel p's
    # entries are start[p] .. start[p + 1] of the sorted list, summed in that order.
    pix = tl.program_id(0).to(tl.int64) * BLOCK_X + tl.arange(0, BLOCK_X)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = pix < NPIX
    cmask = offs_c < C
    lo = tl.load(start_ptr + pix, mask=pm, other=0)
    hi = tl.load(start_ptr + pix + 1, mask=pm, other=0)
    acc = tl.zeros([BLOCK_X, BLOCK_C], dtype=ACC)
    for i in range(0, tl.max(hi - lo, axis=0)):
        e = lo + i
        em = e < hi
        row = tl.load(row_ptr + e, mask=em, other=0)
        w = tl.load(w_ptr + e, mask=em, other=0.0)
        g = tl.load(gt_ptr + row[:, None] * C + offs_c[None, :], mask=em[:, None] & cmask[None, :], other=0.0)
        acc += w[:, None] * g.to(ACC)
    HW = H * W
    img = pix // HW
    p = pix - img * HW
    y = p // W
    dst = out_ptr + (_image_base(img, IMG_INNER, s_outer, s_inner) + y * sH + (p - y * W) * sW)[:, None] + \
        offs_c[None, :] * sC
    m = pm[:, None] & cmask[None, :]
    if ACCUMULATE:  # a later pass of a list too long for one: add to the earlier passes' sums
        acc += tl.load(dst, mask=m, other=0.0).to(ACC)
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m)


# ---- mask pooling ------------------------------------------------------------------------------

@triton.jit
def _resize_tap(o, n_in, scale):
    """F.interpolate(bilinear, align_corners=False) taps of output pixel(s) o: (lo, hi, w_lo, w_hi)."""
    src = tl.maximum(scale * (o.to(scale.dtype) + 0.5) - 0.5, 0.0)
    lo = tl.minimum(src.to(tl.int64), n_in - 1)
    hi = tl.where(lo < n_in - 1, lo + 1, lo)
    lam = tl.minimum(tl.maximum(src - lo.to(src.dtype), 0.0), 1.0)
    return lo, hi, 1.0 - lam, lam


@triton.jit(do_not_specialize=["Hm", "Wm", "H", "W"])  # sizes of 1 would become constexprs
def _resize_masks_kernel(m_ptr, mt_ptr, invz_ptr, R, T, s0, s1, s2, sy, sx, Hm, Wm, H, W, eps: tl.float64,
                         ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    # program = one mask: its resized values [H*W] and 1 / (sum + eps).
    mi = tl.program_id(0).to(tl.int64)
    r = mi % R
    t = (mi // R) % T
    b = mi // (R * T)
    src = m_ptr + b * s0 + t * s1 + r * s2
    HW = H * W
    sh = Hm.to(ACC) / H.to(ACC)  # F.interpolate's scale: input size / output size
    sw = Wm.to(ACC) / W.to(ACC)
    total = tl.zeros([BLOCK_P], dtype=ACC)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < HW
        ylo, yhi, wyl, wyh = _resize_tap(p // W, Hm, sh)
        xlo, xhi, wxl, wxh = _resize_tap(p % W, Wm, sw)
        top = wxl * tl.load(src + ylo * sy + xlo * sx, mask=pm, other=0.0).to(ACC) + \
            wxh * tl.load(src + ylo * sy + xhi * sx, mask=pm, other=0.0).to(ACC)
        bot = wxl * tl.load(src + yhi * sy + xlo * sx, mask=pm, other=0.0).to(ACC) + \
            wxh * tl.load(src + yhi * sy + xhi * sx, mask=pm, other=0.0).to(ACC)
        v = tl.where(pm, wyl * top + wyh * bot, 0.0)
        tl.store(mt_ptr + mi * HW + p, v, mask=pm)
        total += v
    tl.store(invz_ptr + mi, 1.0 / (tl.sum(total, axis=0) + acc_scalar(eps, ACC)))


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr):
    if USE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _mask_pool_fwd_kernel(feat_ptr, mt_ptr, invz_ptr, ts_ptr, table_ptr, out_ptr,
                          R, C, H, W, T, s0, s1, sC, sH, sW, log_base: tl.float64,
                          HAS_ENC: tl.constexpr, HAS_TABLE: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # program = (frame, channel block, region block): out[r, c] = sum_p mt[r, p] f[c, p] / Z_r (+ enc[c])
    bt = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.program_id(2).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cmask = offs_c < C
    rmask = offs_r < R
    HW = H * W
    fbase = feat_ptr + (bt // T) * s0 + (bt % T) * s1
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < HW
        m = tl.load(mt_ptr + (bt * R + offs_r[:, None]) * HW + p[None, :], mask=rmask[:, None] & pm[None, :],
                    other=0.0)
        f = tl.load(fbase + ((p // W) * sH + (p % W) * sW)[:, None] + offs_c[None, :] * sC,
                    mask=pm[:, None] & cmask[None, :], other=0.0).to(ACC)
        acc += _mm(m, f, USE_DOT)
    acc = acc * tl.load(invz_ptr + bt * R + offs_r, mask=rmask, other=0.0)[:, None]
    if HAS_ENC:
        acc += frame_encoding(ts_ptr, table_ptr, bt, offs_c, cmask, C, acc_scalar(log_base, ACC), HAS_TABLE,
                               ACC)[None, :]
    tl.store(out_ptr + (bt * R + offs_r[:, None]) * C + offs_c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _mask_pool_dfeat_kernel(gn_ptr, mt_ptr, gf_ptr, R, C, H, W, T, s0, s1, sC, sH, sW,
                            ACC: tl.constexpr, USE_DOT: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # program = (frame, pixel block, channel block): grad_f[c, p] = sum_r mt[r, p] * gn[r, c]
    bt = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    HW = H * W
    pm = p < HW
    cmask = offs_c < C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rmask = offs_r < R
        mT = tl.load(mt_ptr + (bt * R + offs_r[None, :]) * HW + p[:, None], mask=pm[:, None] & rmask[None, :],
                     other=0.0)
        g = tl.load(gn_ptr + (bt * R + offs_r[:, None]) * C + offs_c[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0)
        acc += _mm(mT, g, USE_DOT)
    dst = gf_ptr + (bt // T) * s0 + (bt % T) * s1 + ((p // W) * sH + (p % W) * sW)[:, None] + offs_c[None, :] * sC
    tl.store(dst, acc.to(gf_ptr.dtype.element_ty), mask=pm[:, None] & cmask[None, :])


@triton.jit
def _mask_pool_gf_kernel(gn_ptr, feat_ptr, gfr_ptr, R, C, H, W, T, s0, s1, sC, sH, sW,
                         ACC: tl.constexpr, USE_DOT: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # program = (frame, pixel block, region block): GF[r, p] = sum_c gn[r, c] * f[c, p]
    bt = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.program_id(2).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    HW = H * W
    pm = p < HW
    rmask = offs_r < R
    fbase = feat_ptr + (bt // T) * s0 + (bt % T) * s1
    acc = tl.zeros([BLOCK_R, BLOCK_P], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        g = tl.load(gn_ptr + (bt * R + offs_r[:, None]) * C + offs_c[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0)
        fT = tl.load(fbase + offs_c[:, None] * sC + ((p // W) * sH + (p % W) * sW)[None, :],
                     mask=cmask[:, None] & pm[None, :], other=0.0).to(ACC)
        acc += _mm(g, fT, USE_DOT)
    tl.store(gfr_ptr + (bt * R + offs_r[:, None]) * HW + p[None, :], acc, mask=rmask[:, None] & pm[None, :])


@triton.jit(do_not_specialize=["Hm", "Wm", "H", "W"])  # sizes of 1 would become constexprs
def _resize_transpose_kernel(gfr_ptr, s_ptr, gm_ptr, Hm, Wm, H, W, ACC: tl.constexpr, NY: tl.constexpr,
                             NX: tl.constexpr, BLOCK_Q: tl.constexpr):
    # program = (mask, block of source pixels q): grad_mask[q] = sum over the resized pixels that
    # read q of their tap weight * (GF - s). Gather form: every output written once, no atomics.
    mi = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    HWm = Hm * Wm
    qm = q < HWm
    sy = q // Wm
    sx = q % Wm
    sh = Hm.to(ACC) / H.to(ACC)
    sw = Wm.to(ACC) / W.to(ACC)
    # resized pixel o reads source i when its source coordinate lies in [i - 1, i + 1): the
    # candidates start one below floor((i - 0.5) / scale - 0.5); NY / NX of them cover the range.
    # One candidate row at a time: a [BLOCK_Q, NX] tile (a [BLOCK_Q, NY, NX] tile spilled 35 KB on sm_90,
    # python -m tests.ops.triton_sm90 --family regional).
    y0 = tl.maximum(tl.floor((sy.to(ACC) - 0.5) / sh - 0.5).to(tl.int64) - 1, 0)
    x = tl.maximum(tl.floor((sx.to(ACC) - 0.5) / sw - 0.5).to(tl.int64) - 1, 0)[:, None] + tl.arange(0, NX)[None, :]
    xlo, xhi, wxl, wxh = _resize_tap(x, Wm, sw)
    wx = tl.where((xlo == sx[:, None]) & (x < W), wxl, 0.0) + tl.where((xhi == sx[:, None]) & (x < W), wxh, 0.0)
    s = tl.load(s_ptr + mi)
    acc = tl.zeros([BLOCK_Q], dtype=ACC)
    for i in range(NY):
        y = y0 + i
        ylo, yhi, wyl, wyh = _resize_tap(y, Hm, sh)
        wy = tl.where((ylo == sy) & (y < H), wyl, 0.0) + tl.where((yhi == sy) & (y < H), wyh, 0.0)
        w = wy[:, None] * wx
        m = qm[:, None] & (w != 0.0)
        v = tl.load(gfr_ptr + mi * H * W + y[:, None] * W + x, mask=m, other=0.0)
        acc += tl.sum(tl.where(m, w * (v - s), 0.0), axis=1)
    tl.store(gm_ptr + mi * HWm + q, acc, mask=qm)


# ---- host wrappers ------------------------------------------------------------------------------

def _empty_like_layout(sizes, device, dtype, channels_last):
    """[..., C, H, W] contiguous, or channels-last (the pixel's channels contiguous)."""
    if not channels_last:
        return torch.empty(sizes, device=device, dtype=dtype)
    d = len(sizes)
    cl = list(sizes[:d - 3]) + [sizes[d - 2], sizes[d - 1], sizes[d - 3]]
    return torch.empty(cl, device=device, dtype=dtype).permute(list(range(d - 3)) + [d - 1, d - 3, d - 2])


def _pool_blocks(P, C, sampling_ratio, device, acc_torch=torch.float32):
    """(BLOCK_P, BLOCK_S, BLOCK_C, num_warps): all bins, a chunk of samples per bin, a channel block.
    Tiles up to 1K elements on a GPU (4 warps; 8 for fp64), 16K under the interpreter (fewer, larger
    programs). At the paper shapes these compile for sm_90 without spills; 8K-element tiles over 8
    warps used all 255 registers and spilled 0.2-1.5 KB, 2K-element ones still up to 0.6 KB in fp64
    (python -m tests.ops.triton_sm90 --family regional prints ptxas's counts)."""
    BLOCK_P = triton.next_power_of_2(max(P, 1))
    BLOCK_S = min(triton.next_power_of_2(sampling_ratio * sampling_ratio), 64) if sampling_ratio > 0 else 16
    cap = 1024 if device.type == "cuda" else 16384
    BLOCK_S = max(1, min(BLOCK_S, cap // BLOCK_P))
    BLOCK_C = max(1, min(triton.next_power_of_2(max(C, 1)), max(1, cap // (BLOCK_P * BLOCK_S)), 1024))
    return BLOCK_P, BLOCK_S, BLOCK_C, (8 if acc_torch == torch.float64 else 4)


def _roi_images_from_rois(rois, N):
    idx = rois[:, 0]
    ok = (idx > -1) & (idx < N)  # out of range (validate=False): skipped, never read
    return torch.where(ok, idx.nan_to_num(0.0).clamp(-1, N).trunc(), torch.full_like(idx, -1)).to(torch.int64).contiguous()


def _pool_fwd(feat, boxes, roi_img, enc, out, C, H, W, img_inner, s_outer, s_inner, strides, spatial_scale, ph, pw,
              sampling_ratio, aligned, base):
    K = boxes.shape[0]
    if K == 0 or C == 0:
        return out
    acc_tl, acc_torch = acc_types(feat.dtype)
    BLOCK_P, BLOCK_S, BLOCK_C, num_warps = _pool_blocks(ph * pw, C, sampling_ratio, feat.device, acc_torch)
    ts, tab, has_table = enc
    boxes = boxes.to(acc_torch).contiguous()
    if ts is None:  # no TPE: any tensor for the unused pointers
        ts = tab = boxes
    sC, sH, sW = strides
    with torch.cuda.device_of(feat):
        _roi_pool_fwd_kernel[(K, triton.cdiv(C, BLOCK_C))](
            feat, boxes, roi_img, ts, tab, out, C, H, W, img_inner, s_outer, s_inner, sC, sH, sW,
            float(spatial_scale), ph, pw, sampling_ratio, float(math.log(base)),
            ALIGNED=bool(aligned), HAS_ENC=enc[0] is not None, HAS_TABLE=has_table, ACC=acc_tl, BLOCK_P=BLOCK_P,
            BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C, num_warps=num_warps)
    return out


# Entries per pass of the deterministic backward: 2^24 taps (about 0.5 GB of keys, rows, weights and
# sort buffers); longer lists run in several passes that add to the earlier passes' sums.
_MAX_ENTRIES = 1 << 24


def _segment_blocks(C):
    """(BLOCK_X pixels, BLOCK_C channels) of the segmented sum: a 1K tile, channels first."""
    BLOCK_C = max(1, min(triton.next_power_of_2(max(C, 1)), 64))
    return 1024 // BLOCK_C, BLOCK_C


def _pool_bwd_sorted(grad, boxes, roi_img, images, sizes, img_inner, channels_last, spatial_scale, ph, pw,
                     sampling_ratio, aligned, max_entries=None, blocks=None):
    """Deterministic RoI-pooling gradient: entries sorted by target pixel, segmented sums (see the kernels)."""
    C, H, W = sizes[-3:]
    K, P = boxes.shape[0], ph * pw
    acc_tl, acc_torch = acc_types(grad.dtype)
    dev = grad.device
    scale = float(spatial_scale)
    common = dict(ALIGNED=bool(aligned), ACC=acc_tl)
    counts = torch.empty(K, dtype=torch.int64, device=dev)
    with torch.cuda.device_of(boxes):
        _roi_sample_counts_kernel[(triton.cdiv(K, 256),)](boxes, roi_img, counts, K, scale, ph, pw, sampling_ratio,
                                                          BLOCK_K=256, **common)
    first = torch.cumsum(counts, 0) - counts  # first sample of each RoI in the flat list
    total = int(counts.sum())  # samples (4 entries each): sizes the buffers (a device sync)
    per_pass = max(1, (max_entries or _MAX_ENTRIES) // 4)
    passes = max(1, triton.cdiv(total, per_pass))
    out = _empty_like_layout(sizes, dev, grad.dtype if passes == 1 else acc_torch, channels_last)
    gt = grad.reshape(K, C, P).transpose(1, 2).contiguous()  # [K, P, C]: an entry's channels contiguous
    npix = images * H * W
    pixels = torch.arange(npix + 1, device=dev)
    BLOCK_X, BLOCK_C = blocks or _segment_blocks(C)
    strides = (out.stride(0), out.stride(1) if img_inner > 1 else 0, out.stride(-3), out.stride(-2), out.stride(-1))
    for j in range(passes):
        s_lo, s_hi = j * per_pass, min(total, (j + 1) * per_pass)
        n = 4 * (s_hi - s_lo)
        keys = torch.empty(n, dtype=torch.int64, device=dev)
        rows = torch.empty(n, dtype=torch.int64, device=dev)
        w = torch.empty(n, dtype=acc_torch, device=dev)
        if n:
            with torch.cuda.device_of(boxes):
                _roi_entries_kernel[(K,)](boxes, roi_img, first, keys, rows, w, s_lo, s_hi, npix, H, W, scale, ph, pw,
                                          sampling_ratio, BLOCK_S=128, **common)
        keys, perm = torch.sort(keys, stable=True)  # stable: a pixel's entries keep their list order
        start = torch.searchsorted(keys, pixels)
        with torch.cuda.device_of(gt):
            _roi_segment_sum_kernel[(triton.cdiv(npix, BLOCK_X), triton.cdiv(C, BLOCK_C))](
                start, rows[perm], w[perm], gt, out, npix, C, H, W, img_inner, *strides, ACCUMULATE=j > 0, ACC=acc_tl,
                BLOCK_X=BLOCK_X, BLOCK_C=BLOCK_C)
    return out.to(grad.dtype)


def _pool_bwd(grad, boxes, roi_img, images, sizes, img_inner, channels_last, spatial_scale, ph, pw, sampling_ratio,
              aligned, deterministic):
    """Gradient [..., C, H, W] (grad's dtype, layout per channels_last) of the RoI pooling."""
    C, H, W = sizes[-3:]
    acc_tl, acc_torch = acc_types(grad.dtype)
    K = boxes.shape[0]
    if K == 0 or C == 0 or H * W == 0 or images == 0:
        return _empty_like_layout(sizes, grad.device, grad.dtype, channels_last).zero_()
    grad = grad.contiguous()
    boxes = boxes.to(acc_torch).contiguous()
    if deterministic:
        return _pool_bwd_sorted(grad, boxes, roi_img, images, sizes, img_inner, channels_last, spatial_scale, ph, pw,
                                sampling_ratio, aligned)
    gbuf = _empty_like_layout(sizes, grad.device, acc_torch, channels_last).zero_()
    s_outer, s_inner = gbuf.stride(0), (gbuf.stride(1) if img_inner > 1 else 0)
    sC, sH, sW = gbuf.stride(-3), gbuf.stride(-2), gbuf.stride(-1)
    BLOCK_P, BLOCK_S, BLOCK_C, num_warps = _pool_blocks(ph * pw, C, sampling_ratio, grad.device, acc_torch)
    with torch.cuda.device_of(grad):
        _roi_pool_bwd_atomic_kernel[(K, triton.cdiv(C, BLOCK_C))](
            grad, boxes, roi_img, gbuf, C, H, W, img_inner, s_outer, s_inner, sC, sH, sW,
            float(spatial_scale), ph, pw, sampling_ratio, ALIGNED=bool(aligned),
            ACC=acc_tl, BLOCK_P=BLOCK_P, BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C, num_warps=num_warps)
    return gbuf.to(grad.dtype)


def roi_align_fwd(input, rois, spatial_scale, ph, pw, sampling_ratio, aligned):
    N, C, H, W = input.shape
    K = rois.shape[0]
    out = torch.empty(K, C, ph, pw, device=input.device, dtype=input.dtype)
    if K == 0 or C == 0:
        return out
    roi_img = _roi_images_from_rois(rois, N)
    return _pool_fwd(input, rois[:, 1:], roi_img, (None, None, False), out, C, H, W, 1, input.stride(0), 0,
                     (input.stride(1), input.stride(2), input.stride(3)), spatial_scale, ph, pw, sampling_ratio,
                     aligned, 10000.0)


def roi_align_bwd(grad, rois, spatial_scale, ph, pw, sampling_ratio, aligned, N, H, W, channels_last, deterministic):
    C = grad.shape[1]
    roi_img = _roi_images_from_rois(rois, N)
    return _pool_bwd(grad, rois[:, 1:], roi_img, N, (N, C, H, W), 1, channels_last, spatial_scale, ph, pw,
                     sampling_ratio, aligned, deterministic)


def _region_images(boxes, valid):
    B, T, R = boxes.shape[:3]
    img = torch.arange(B * T, device=boxes.device).repeat_interleave(R)
    if valid is not None:
        img = torch.where(valid.reshape(-1), img, torch.full_like(img, -1))
    return img.contiguous()


def region_pool_fwd(features, boxes, valid, timestamps, table, spatial_scale, ph, pw, sampling_ratio, aligned,
                    base=10000.0):
    B, T, C, H, W = features.shape
    R = boxes.shape[2]
    out = torch.empty(B, T, R, C, ph, pw, device=features.device, dtype=features.dtype)
    if B * T * R == 0 or C == 0:
        return out
    _, acc_torch = acc_types(features.dtype)
    enc = (None, None, False)
    if timestamps is not None:
        ts, tab = encoder_inputs(timestamps, table, acc_torch)
        enc = (ts, tab, table is not None)
    return _pool_fwd(features, boxes.reshape(B * T * R, 4), _region_images(boxes, valid), enc, out, C, H, W, T,
                     features.stride(0), features.stride(1),
                     (features.stride(2), features.stride(3), features.stride(4)), spatial_scale, ph, pw,
                     sampling_ratio, aligned, base)


def region_pool_bwd(grad, boxes, valid, spatial_scale, ph, pw, sampling_ratio, aligned, H, W, channels_last,
                    deterministic):
    B, T, R, C = grad.shape[:4]
    return _pool_bwd(grad.reshape(B * T * R, C, ph, pw), boxes.reshape(B * T * R, 4), _region_images(boxes, valid),
                     B * T, (B, T, C, H, W), T, channels_last, spatial_scale, ph, pw, sampling_ratio, aligned,
                     deterministic)


def _resize(masks, H, W, eps, acc_tl, acc_torch):
    """Resized masks [BT*R, H*W] and 1 / (sum + eps) [BT*R], in the accumulation dtype."""
    B, T, R, Hm, Wm = masks.shape
    n = B * T * R
    mt = torch.empty(n, H * W, device=masks.device, dtype=acc_torch)
    invz = torch.empty(n, device=masks.device, dtype=acc_torch)
    if n:
        with torch.cuda.device_of(masks):
            _resize_masks_kernel[(n,)](masks, mt, invz, R, T, masks.stride(0), masks.stride(1), masks.stride(2),
                                       masks.stride(3), masks.stride(4), Hm, Wm, H, W,
                                       float(eps),
                                       ACC=acc_tl, BLOCK_P=min(triton.next_power_of_2(H * W), 1024))
    return mt, invz


def _mm_blocks(R, C, HW, acc_torch):
    """(USE_DOT, BLOCK_R, BLOCK_P, BLOCK_C) of the mask-pool matmul kernels. 32 pixels per step: with
    64 the fp32 forward (16 x 64 x 64, 4 warps) spilled 512 B on sm_90, the fp64 feature gradient 72 B
    (python -m tests.ops.triton_sm90 --family regional)."""
    use_dot = acc_torch == torch.float32
    lo = 16 if use_dot else 1
    BLOCK_R = max(lo, min(triton.next_power_of_2(max(R, 1)), 64))
    BLOCK_C = max(lo, min(triton.next_power_of_2(max(C, 1)), 64))
    BLOCK_P = max(lo, min(triton.next_power_of_2(max(HW, 1)), 32))
    return use_dot, BLOCK_R, BLOCK_P, BLOCK_C


def _transpose_blocks(Hm, Wm, H, W):
    """(NY, NX, BLOCK_Q) of _resize_transpose_kernel: candidate rows / columns per source pixel, and
    source pixels per program (a 2K-element [BLOCK_Q, NX] tile)."""
    NY = triton.next_power_of_2(math.ceil(2 * H / Hm) + 4)
    NX = triton.next_power_of_2(math.ceil(2 * W / Wm) + 4)
    return NY, NX, max(1, min(triton.next_power_of_2(Hm * Wm), 2048 // NX))


def mask_pool_fwd(features, masks, timestamps, table, eps, base=10000.0):
    """Returns (out [B, T, R, C], the resized masks [B, T, R, H, W] and 1 / (sum + eps) [B, T, R] in the
    accumulation dtype): mask_pool_bwd takes the last two instead of resizing the masks again."""
    B, T, C, H, W = features.shape
    R = masks.shape[2]
    out = torch.empty(B, T, R, C, device=features.device, dtype=features.dtype)
    acc_tl, acc_torch = acc_types(features.dtype)
    mt, invz = _resize(masks, H, W, eps, acc_tl, acc_torch)
    result = out, mt.view(B, T, R, H, W), invz.view(B, T, R)
    if B * T * R == 0 or C == 0:
        return result
    ts, tab = (mt, mt)  # no TPE: any tensor for the unused pointers
    if timestamps is not None:
        ts, tab = encoder_inputs(timestamps, table, acc_torch)
    use_dot, BLOCK_R, BLOCK_P, BLOCK_C = _mm_blocks(R, C, H * W, acc_torch)
    with torch.cuda.device_of(features):
        _mask_pool_fwd_kernel[(B * T, triton.cdiv(C, BLOCK_C), triton.cdiv(R, BLOCK_R))](
            features, mt, invz, ts, tab, out, R, C, H, W, T, features.stride(0), features.stride(1), features.stride(2),
            features.stride(3), features.stride(4),
            float(math.log(base)), HAS_ENC=timestamps is not None, HAS_TABLE=table is not None,
            ACC=acc_tl, USE_DOT=use_dot, BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return result


def mask_pool_bwd(grad, features, masks, resized, inv_z, need_features_grad, need_masks_grad, channels_last):
    B, T, C, H, W = features.shape
    R, Hm, Wm = masks.shape[2:]
    acc_tl, acc_torch = acc_types(features.dtype)
    gf = (_empty_like_layout((B, T, C, H, W), features.device, features.dtype, channels_last)
          if need_features_grad else features.new_empty(0))
    gm = torch.empty(masks.shape, device=masks.device, dtype=masks.dtype) if need_masks_grad else masks.new_empty(0)
    if B * T * R == 0 or C == 0:
        return gf.zero_(), gm.zero_()
    mt, invz = resized.reshape(B * T * R, H * W), inv_z.reshape(B * T * R)  # the forward's resize, not redone
    gn = (grad.to(acc_torch) * invz.view(B, T, R, 1)).contiguous()  # grad / Z
    use_dot, BLOCK_R, BLOCK_P, BLOCK_C = _mm_blocks(R, C, H * W, acc_torch)
    HW = H * W
    if need_features_grad:
        with torch.cuda.device_of(gn):
            _mask_pool_dfeat_kernel[(B * T, triton.cdiv(HW, BLOCK_P), triton.cdiv(C, BLOCK_C))](
                gn, mt, gf, R, C, H, W, T, gf.stride(0), gf.stride(1), gf.stride(2), gf.stride(3), gf.stride(4),
                ACC=acc_tl, USE_DOT=use_dot, BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    if need_masks_grad:
        gfr = torch.empty(B * T * R, HW, device=features.device, dtype=acc_torch)
        # channel steps of 32: 64 spilled on sm_90, 16 B in bf16 and 4 B in fp64
        # (python -m tests.ops.triton_sm90 --family regional)
        with torch.cuda.device_of(gn):
            _mask_pool_gf_kernel[(B * T, triton.cdiv(HW, BLOCK_P), triton.cdiv(R, BLOCK_R))](
                gn, features, gfr, R, C, H, W, T, features.stride(0), features.stride(1), features.stride(2),
                features.stride(3), features.stride(4), ACC=acc_tl, USE_DOT=use_dot, BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P,
                BLOCK_C=min(BLOCK_C, 32))
        # d out / d m~_p = (f_p - out) / Z: the mean term s_r = sum_p (m~_p / Z) GF_p, GF carrying 1 / Z.
        s = ((mt * gfr).sum(-1) * invz).contiguous()
        gmb = torch.empty(B * T * R, Hm * Wm, device=masks.device, dtype=acc_torch)
        NY, NX, BLOCK_Q = _transpose_blocks(Hm, Wm, H, W)
        with torch.cuda.device_of(gfr):
            _resize_transpose_kernel[(B * T * R, triton.cdiv(Hm * Wm, BLOCK_Q))](
                gfr, s, gmb, Hm, Wm, H, W, ACC=acc_tl, NY=NY, NX=NX, BLOCK_Q=BLOCK_Q)
        gm.copy_(gmb.view(masks.shape))
    return gf, gm
