"""Triton kernels for Timestamp Positional Encoding (TPE). Imports only torch, triton and _common.py.

    tpe_add(x, timestamps, table=None, base=10000.0, out=None)
        x [B, T, N, D] + enc(frame) broadcast over N. enc is a table row (learned variant:
        integer timestamps index table [L, D]) or the sinusoid of t seconds (paper variant):
        p[2i] = sin(t / base^(2i/D)), p[2i+1] = cos(t / base^(2i/D)), computed in the kernel.
    tpe_table_grad(grad, timestamps, num_rows, deterministic)
        fp32 [num_rows, D]: sum of grad over N per frame, scattered into the frame's table row.
    tpe_ds_ln_fwd / tpe_ds_ln_bwd
        TPE + window x window downsample of an h x w grid + LayerNorm, fused (the projector prologue).

Arithmetic in the accumulation dtype of _common.py (fp32; fp64 for fp64 inputs). Set
TRITON_INTERPRET=1 before importing this file to run the kernels on CPU tensors.
"""

import math

import torch
import triton
import triton.language as tl

try:  # installed as rgpt4d.kernels
    from ._common import acc_scalar, acc_types
except ImportError:  # copied next to _common.py as top-level modules
    from _common import acc_scalar, acc_types


@triton.jit
def frame_encoding(ts_ptr, table_ptr, frame, offs_d, dmask, D, log_base,
                    HAS_TABLE: tl.constexpr, ACC: tl.constexpr):
    """Encoding of `frame` (scalar or vector of frame ids) at channels offs_d, in ACC."""
    if HAS_TABLE:
        row = tl.load(ts_ptr + frame)
        enc = tl.load(table_ptr + row * D + offs_d, mask=dmask, other=0.0).to(ACC)
    else:
        t = tl.load(ts_ptr + frame).to(ACC)
        two_i = (offs_d - (offs_d % 2)).to(ACC)
        inv_freq = tl.exp(-(two_i / D) * log_base)
        a = t * inv_freq
        enc = tl.where((offs_d % 2) == 1, tl.cos(a), tl.sin(a))
    return enc


@triton.jit
def _tpe_add_kernel(x_ptr, ts_ptr, table_ptr, out_ptr, N, D, log_base: tl.float64,
                    HAS_TABLE: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    log_base = acc_scalar(log_base, ACC)
    frame = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        enc = frame_encoding(ts_ptr, table_ptr, frame, offs_d, dmask, D, log_base, HAS_TABLE, ACC)
        offs = (frame * N + offs_n[:, None]) * D + offs_d[None, :]
        m = nmask[:, None] & dmask[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
        tl.store(out_ptr + offs, (x + enc[None, :]).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _tpe_frame_sum_kernel(g_ptr, ts_ptr, part_ptr, out_ptr, N, D,
                          DETERMINISTIC: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    frame = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m = (offs_n[:, None] < N) & dmask[None, :]
        g = tl.load(g_ptr + (frame * N + offs_n[:, None]) * D + offs_d[None, :], mask=m, other=0.0)
        acc += tl.sum(g.to(ACC), axis=0)
    if DETERMINISTIC:
        tl.store(part_ptr + frame * D + offs_d, acc, mask=dmask)
    else:
        row = tl.load(ts_ptr + frame)
        tl.atomic_add(out_ptr + row * D + offs_d, acc, mask=dmask)


@triton.jit
def _tpe_scatter_rows_kernel(part_ptr, ts_ptr, out_ptr, BT, D, BLOCK_D: tl.constexpr):
    # One program owns a slice of channels and adds frames in order: no races, no atomics.
    offs_d = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    for i in range(0, BT):
        row = tl.load(ts_ptr + i)
        cur = tl.load(out_ptr + row * D + offs_d, mask=dmask, other=0.0)
        add = tl.load(part_ptr + i * D + offs_d, mask=dmask, other=0.0)
        tl.store(out_ptr + row * D + offs_d, cur + add, mask=dmask)


@triton.jit
def _ds_slot(x_ptr, rows, rmask, frame, oy, ox, dy, dx, H, W, D, offs_d, dmask, enc, WIN: tl.constexpr,
             ACC: tl.constexpr):
    """Values of window slot (dy, dx) for a block of output tokens: [BLOCK_R, BLOCK_D], zero on padding."""
    yy = oy * WIN + dy
    xx = ox * WIN + dx
    valid = rmask & (yy < H) & (xx < W)
    src = (frame * H + yy) * W + xx
    m = valid[:, None] & dmask[None, :]
    v = tl.load(x_ptr + src[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(ACC)
    return tl.where(m, v + enc, 0.0), src, m


@triton.jit
def _ds_ln_grad_tile(g_ptr, x_ptr, w_ptr, rows, rmask, frame, oy, ox, j, mean, rstd, H, W, D, offs_d, dmask, omask,
                     enc, WIN: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr):
    """Window slot j of a block of output tokens, as both passes of the LayerNorm input gradient read
    it: (xhat, g = grad_out * weight, the slot's source pixels, their load mask)."""
    v, src, m = _ds_slot(x_ptr, rows, rmask, frame, oy, ox, j // WIN, j % WIN, H, W, D, offs_d, dmask, enc, WIN, ACC)
    xhat = (v - mean[:, None]) * rstd[:, None]
    g = tl.load(g_ptr + rows[:, None] * (WIN * WIN * D) + j * D + offs_d[None, :], mask=omask, other=0.0).to(ACC)
    if HAS_W:
        g = g * tl.load(w_ptr + j * D + offs_d, mask=dmask, other=0.0).to(ACC)[None, :]
    return xhat, g, src, m


@triton.jit
def _ds_rows(rows_c, M, Wo):
    """Frame and output position (oy, ox) of a block of output tokens (row ids already clamped)."""
    frame = rows_c // M
    o = rows_c % M
    return frame, o // Wo, o % Wo


@triton.jit
def _tpe_ds_ln_fwd_kernel(x_ptr, ts_ptr, table_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr,
                          ROWS, M, H, W, Wo, D, eps: tl.float64, log_base: tl.float64,
                          WIN: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Three passes over the row's WIN*WIN*D values (mean, centred variance, output), each a loop over
    # channel blocks of BLOCK_D (capped: a whole row of D = 1152 in registers spills on sm_90) and,
    # inside, the WIN*WIN window slots; the encoding of a channel block is computed once per pass.
    eps = acc_scalar(eps, ACC)
    log_base = acc_scalar(log_base, ACC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < ROWS
    frame, oy, ox = _ds_rows(tl.where(rmask, rows, 0), M, Wo)
    K = WIN * WIN * D
    s = tl.zeros([BLOCK_R], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        enc = frame_encoding(ts_ptr, table_ptr, frame[:, None], offs_d[None, :], dmask[None, :], D, log_base,
                              HAS_TABLE, ACC)
        for j in tl.static_range(WIN * WIN):
            v, src, m = _ds_slot(x_ptr, rows, rmask, frame, oy, ox, j // WIN, j % WIN, H, W, D, offs_d, dmask, enc,
                                 WIN, ACC)
            s += tl.sum(v, axis=1)
    mean = s / K
    ss = tl.zeros([BLOCK_R], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        enc = frame_encoding(ts_ptr, table_ptr, frame[:, None], offs_d[None, :], dmask[None, :], D, log_base,
                              HAS_TABLE, ACC)
        for j in tl.static_range(WIN * WIN):
            v, src, m = _ds_slot(x_ptr, rows, rmask, frame, oy, ox, j // WIN, j % WIN, H, W, D, offs_d, dmask, enc,
                                 WIN, ACC)
            c = tl.where(dmask[None, :], v - mean[:, None], 0.0)
            ss += tl.sum(c * c, axis=1)
    rstd = 1.0 / tl.sqrt(ss / K + eps)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        omask = rmask[:, None] & dmask[None, :]
        enc = frame_encoding(ts_ptr, table_ptr, frame[:, None], offs_d[None, :], dmask[None, :], D, log_base,
                              HAS_TABLE, ACC)
        for j in tl.static_range(WIN * WIN):
            v, src, m = _ds_slot(x_ptr, rows, rmask, frame, oy, ox, j // WIN, j % WIN, H, W, D, offs_d, dmask, enc,
                                 WIN, ACC)
            y = (v - mean[:, None]) * rstd[:, None]
            if HAS_W:
                y = y * tl.load(w_ptr + j * D + offs_d, mask=dmask, other=0.0).to(ACC)[None, :]
            if HAS_B:
                y = y + tl.load(b_ptr + j * D + offs_d, mask=dmask, other=0.0).to(ACC)[None, :]
            tl.store(out_ptr + rows[:, None] * K + j * D + offs_d[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=omask)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _tpe_ds_ln_dx_kernel(g_ptr, x_ptr, ts_ptr, table_ptr, w_ptr, mean_ptr, rstd_ptr, gx_ptr,
                         ROWS, M, H, W, Wo, D, log_base: tl.float64,
                         WIN: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Two passes (the row sums c1 = mean(g), c2 = mean(g * xhat), then dx), channel blocks as forward;
    # both read a slot's tile with _ds_ln_grad_tile. The channel block's set-up stays inline: in a helper
    # the fp64 kernel spilled 76 B on sm_90 (python -m tests.ops.triton_sm90 --family tpe --dtypes float64).
    log_base = acc_scalar(log_base, ACC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < ROWS
    rows_c = tl.where(rmask, rows, 0)
    frame, oy, ox = _ds_rows(rows_c, M, Wo)
    K = WIN * WIN * D
    mean = tl.load(mean_ptr + rows_c).to(ACC)
    rstd = tl.load(rstd_ptr + rows_c).to(ACC)
    c1 = tl.zeros([BLOCK_R], dtype=ACC)
    c2 = tl.zeros([BLOCK_R], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        omask = rmask[:, None] & dmask[None, :]
        enc = frame_encoding(ts_ptr, table_ptr, frame[:, None], offs_d[None, :], dmask[None, :], D, log_base,
                             HAS_TABLE, ACC)
        for j in tl.static_range(WIN * WIN):
            xhat, g, src, m = _ds_ln_grad_tile(g_ptr, x_ptr, w_ptr, rows, rmask, frame, oy, ox, j, mean, rstd, H, W,
                                               D, offs_d, dmask, omask, enc, WIN, HAS_W, ACC)
            c1 += tl.sum(g, axis=1)
            c2 += tl.sum(tl.where(omask, g * xhat, 0.0), axis=1)
    c1 = c1 / K
    c2 = c2 / K
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        omask = rmask[:, None] & dmask[None, :]
        enc = frame_encoding(ts_ptr, table_ptr, frame[:, None], offs_d[None, :], dmask[None, :], D, log_base,
                             HAS_TABLE, ACC)
        for j in tl.static_range(WIN * WIN):
            xhat, g, src, m = _ds_ln_grad_tile(g_ptr, x_ptr, w_ptr, rows, rmask, frame, oy, ox, j, mean, rstd, H, W,
                                               D, offs_d, dmask, omask, enc, WIN, HAS_W, ACC)
            dx = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
            tl.store(gx_ptr + src[:, None] * D + offs_d[None, :], dx.to(gx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _tpe_ds_ln_wb_kernel(g_ptr, x_ptr, ts_ptr, table_ptr, mean_ptr, rstd_ptr, pw_ptr, pb_ptr,
                         ROWS, ROWS_PER_SPLIT, M, H, W, Wo, D, log_base: tl.float64,
                         WIN: tl.constexpr, HAS_TABLE: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    log_base = acc_scalar(log_base, ACC)
    # program (slot-and-channel block, row split): partial sums of g*xhat and g over its rows.
    ndb = tl.cdiv(D, BLOCK_D)
    j = tl.program_id(0) // ndb
    offs_d = (tl.program_id(0) % ndb) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    split = tl.program_id(1).to(tl.int64)
    K = WIN * WIN * D
    dy = j // WIN
    dx = j % WIN
    aw = tl.zeros([BLOCK_D], dtype=ACC)
    ab = tl.zeros([BLOCK_D], dtype=ACC)
    r_end = tl.minimum(ROWS, (split + 1) * ROWS_PER_SPLIT)
    for r0 in range(split * ROWS_PER_SPLIT, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        rows_c = tl.where(rmask, rows, 0)
        omask = rmask[:, None] & dmask[None, :]
        g = tl.load(g_ptr + rows[:, None] * K + j * D + offs_d[None, :], mask=omask, other=0.0).to(ACC)
        if NEED_B:
            ab += tl.sum(g, axis=0)
        if NEED_W:
            frame, oy, ox = _ds_rows(rows_c, M, Wo)
            enc = frame_encoding(ts_ptr, table_ptr, frame[:, None], offs_d[None, :], dmask[None, :], D, log_base,
                                 HAS_TABLE, ACC)
            v, src, m = _ds_slot(x_ptr, rows, rmask, frame, oy, ox, dy, dx, H, W, D, offs_d, dmask, enc, WIN, ACC)
            mean = tl.load(mean_ptr + rows_c).to(ACC)
            rstd = tl.load(rstd_ptr + rows_c).to(ACC)
            xhat = (v - mean[:, None]) * rstd[:, None]
            aw += tl.sum(tl.where(omask, g * xhat, 0.0), axis=0)
    if NEED_W:
        tl.store(pw_ptr + split * K + j * D + offs_d, aw, mask=dmask)
    if NEED_B:
        tl.store(pb_ptr + split * K + j * D + offs_d, ab, mask=dmask)


# ---- host wrappers ------------------------------------------------------------------------

def encoder_inputs(timestamps, table, acc_torch):
    """(ts, table) as the kernels read them: int64 rows + table, or seconds in the acc dtype."""
    if table is not None:
        return timestamps.to(torch.int64).contiguous(), table.contiguous()
    return timestamps.to(acc_torch).contiguous(), timestamps  # table_ptr unused: any tensor


def _block_d(D, cap=1024):
    return min(triton.next_power_of_2(max(D, 1)), cap)


def _ds_ln_blocks(rows, D, device, dtype):
    """(BLOCK_R, BLOCK_D, num_warps) of the downsample + LayerNorm row kernels. On a GPU a [4, 128]
    tile ([2, 128] in fp64) at 8 warps: compiled for sm_90 at D = 1152 (9 channel blocks, no idle lane) neither kernel
    spills (`python -m tests.ops.triton_sm90 --family tpe`), where a whole row (BLOCK_D 2048) spilled
    ~0.5 KB and [8, 128] at 4 warps 0.4-1.5 KB (the 9 window slots' loads are in flight at once).
    The interpreter runs one program at a time in Python: larger tiles."""
    if device.type == "cpu":
        BLOCK_D = _block_d(D, 2048)
        return max(1, min(triton.next_power_of_2(rows), 4096 // BLOCK_D)), BLOCK_D, 4
    BLOCK_D = _block_d(D, 128)
    tile = 256 if dtype == torch.float64 else 512  # fp64 at [4, 128]: the input gradient spilled 32 B (Triton 3.6)
    return max(1, min(triton.next_power_of_2(rows), tile // BLOCK_D)), BLOCK_D, 8


def tpe_add(x, timestamps, table=None, base=10000.0, out=None):
    """x + encoding; `out` may be x itself (in place). x is made contiguous if it is not."""
    B, T, N, D = x.shape
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    acc_tl, acc_torch = acc_types(x.dtype)
    ts, tab = encoder_inputs(timestamps, table, acc_torch)
    BLOCK_D = _block_d(D, 256)
    # on a GPU 4096 elements at 8 warps: 8192 at 4 warps spilled (fp32 learned 16 B, fp64 ~180 B) on sm_90
    # (python -m tests.ops.triton_sm90 --family tpe)
    cpu = x.device.type == "cpu"
    BLOCK_N = max(1, min(triton.next_power_of_2(N), (8192 if cpu else 4096) // BLOCK_D))
    grid = (B * T, triton.cdiv(N, BLOCK_N))
    with torch.cuda.device_of(x):
        _tpe_add_kernel[grid](x, ts, tab, out, N, D, math.log(base), HAS_TABLE=table is not None, ACC=acc_tl,
                              BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4 if cpu else 8)
    return out


def tpe_table_grad(grad, timestamps, num_rows, deterministic=True):
    B, T, N, D = grad.shape
    acc_tl, acc_torch = acc_types(grad.dtype)
    out = torch.zeros(num_rows, D, device=grad.device, dtype=acc_torch)
    if B * T == 0 or D == 0:
        return out
    grad = grad.contiguous()
    rows = timestamps.to(torch.int64).contiguous()
    part = torch.empty(B * T, D, device=grad.device, dtype=acc_torch) if deterministic else out
    BLOCK_D = _block_d(D, 256)
    BLOCK_N = max(1, min(triton.next_power_of_2(max(N, 1)), 8192 // BLOCK_D))
    with torch.cuda.device_of(grad):
        _tpe_frame_sum_kernel[(B * T, triton.cdiv(D, BLOCK_D))](grad, rows, part, out, N, D,
                                                               DETERMINISTIC=deterministic, ACC=acc_tl,
                                                               BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
        if deterministic:
            _tpe_scatter_rows_kernel[(triton.cdiv(D, BLOCK_D),)](part, rows, out, B * T, D, BLOCK_D=BLOCK_D)
    return out


def _ds_geometry(h, w, window):
    return -(-h // window), -(-w // window)


def tpe_ds_ln_fwd(x, timestamps, table, weight, bias, h, w, window, eps, base=10000.0):
    """Returns (out [B, T, M, K], mean [B, T, M], rstd [B, T, M]); stats in the acc dtype."""
    B, T, HW, D = x.shape
    Ho, Wo = _ds_geometry(h, w, window)
    M, K = Ho * Wo, window * window * D
    acc_tl, acc_torch = acc_types(x.dtype)
    x = x.contiguous()
    out = torch.empty(B, T, M, K, device=x.device, dtype=x.dtype)
    mean = torch.empty(B, T, M, device=x.device, dtype=acc_torch)
    rstd = torch.empty(B, T, M, device=x.device, dtype=acc_torch)
    rows = B * T * M
    if rows == 0 or K == 0:
        return out, mean, rstd
    ts, tab = encoder_inputs(timestamps, table, acc_torch)
    BLOCK_R, BLOCK_D, warps = _ds_ln_blocks(rows, D, x.device, x.dtype)
    wt = weight.contiguous() if weight is not None else x
    bs = bias.contiguous() if bias is not None else x
    with torch.cuda.device_of(x):
        _tpe_ds_ln_fwd_kernel[(triton.cdiv(rows, BLOCK_R),)](
            x, ts, tab, wt, bs, out, mean, rstd, rows, M, h, w, Wo, D, float(eps), math.log(base),
            WIN=window, HAS_TABLE=table is not None, HAS_W=weight is not None, HAS_B=bias is not None, ACC=acc_tl,
            BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps)
    return out, mean, rstd


def tpe_ds_ln_bwd(grad_out, x, timestamps, table, weight, mean, rstd, h, w, window, base=10000.0,
                  need_input_grad=True, need_weight_grad=True, need_bias_grad=True, row_splits=None):
    """Returns (grad_x or empty, grad_weight fp32/fp64 [K] or empty, grad_bias [K] or empty)."""
    B, T, HW, D = x.shape
    Ho, Wo = _ds_geometry(h, w, window)
    M, K = Ho * Wo, window * window * D
    acc_tl, acc_torch = acc_types(x.dtype)
    need_weight_grad = need_weight_grad and weight is not None
    def empty():
        return torch.empty(0, device=x.device, dtype=acc_torch)

    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_input_grad else x.new_empty(0)
    rows = B * T * M
    if rows == 0 or K == 0:
        zk = torch.zeros(K, device=x.device, dtype=acc_torch)
        return gx, (zk if need_weight_grad else empty()), (zk.clone() if need_bias_grad else empty())
    x = x.contiguous()
    g = grad_out.contiguous()
    ts, tab = encoder_inputs(timestamps, table, acc_torch)
    BLOCK_R, BLOCK_D, warps = _ds_ln_blocks(rows, D, x.device, x.dtype)
    wt = weight.contiguous() if weight is not None else x
    if need_input_grad:
        with torch.cuda.device_of(x):
            _tpe_ds_ln_dx_kernel[(triton.cdiv(rows, BLOCK_R),)](
                g, x, ts, tab, wt, mean, rstd, gx, rows, M, h, w, Wo, D, math.log(base),
                WIN=window, HAS_TABLE=table is not None, HAS_W=weight is not None, ACC=acc_tl,
                BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps)
    gw, gb = empty(), empty()
    if need_weight_grad or need_bias_grad:
        splits = row_splits or max(1, min(64, triton.cdiv(rows, 256)))
        rows_per_split = triton.cdiv(rows, splits)
        BD = _block_d(D, 128)
        # [8, 128] on a GPU ([4, 128] in fp64): [32, 128] spilled 176 B on sm_90 at D = 1152
        # (python -m tests.ops.triton_sm90 --family tpe)
        tile = 4096 if x.device.type == "cpu" else (512 if x.dtype == torch.float64 else 1024)
        BR = max(1, min(triton.next_power_of_2(rows_per_split), tile // BD))
        pw = torch.empty(splits, K, device=x.device, dtype=acc_torch) if need_weight_grad else empty()
        pb = torch.empty(splits, K, device=x.device, dtype=acc_torch) if need_bias_grad else empty()
        with torch.cuda.device_of(x):
            _tpe_ds_ln_wb_kernel[(window * window * triton.cdiv(D, BD), splits)](
                g, x, ts, tab, mean, rstd, pw, pb, rows, rows_per_split, M, h, w, Wo, D, math.log(base),
                WIN=window, HAS_TABLE=table is not None, NEED_W=need_weight_grad, NEED_B=need_bias_grad,
                ACC=acc_tl, BLOCK_R=BR, BLOCK_D=BD)
        gw = pw.sum(0) if need_weight_grad else gw  # fixed split order: deterministic
        gb = pb.sum(0) if need_bias_grad else gb
    return gx, gw, gb
