"""Triton kernels for the language-model head. Imports only torch, triton, _common.py and
linear_loss.py.

    linear_cross_entropy(h, weight, bias, target, ignore_index, reduction, chunk_size,
                         need_h, need_w, need_b) -> (loss, grad_h or [0], grad_w or [0], grad_b or [0])
        The LM head's Linear fused with the cross-entropy of its logits. Same contract as
        torch.ops.rgpt4d.linear_cross_entropy (csrc/lm/lm.cpp): only the rows whose target is not
        ignore_index are projected, chunk_size rows at a time (linear_loss.py's driver: torch
        matmuls for the GEMMs), and a Triton kernel turns each chunk of logits into the row losses
        and, in place, the gradient scale * (softmax - onehot). reduction 1 mean (NaN when no row is
        selected, as F.cross_entropy), 2 sum. grad_w / grad_b are in the accumulation dtype.
    rms_norm(x, weight, eps) -> (y, rstd); rms_norm_backward(grad_y, x, weight, rstd, need_x, need_w)
        Qwen2RMSNorm: y = weight * (x * rstd rounded to x's dtype), rstd = 1 / sqrt(mean(x^2) + eps);
        one program per row. grad_w (a column sum over rows) is a torch reduction.
    swiglu(gate, up) -> silu(gate) * up; swiglu_backward(grad, gate, up) -> (grad_gate, grad_up)
        Qwen2MLP's activation, one elementwise pass each way.

Arithmetic in the accumulation dtype of _common.py (fp32; fp64 for fp64 inputs). Set
TRITON_INTERPRET=1 before importing this file to run the kernels on CPU tensors.
"""

import torch
import triton
import triton.language as tl

try:  # installed as rgpt4d.kernels
    from ._common import acc_dtype, acc_scalar, acc_types
    from .linear_loss import linear_loss_chunks
except ImportError:  # copied next to _common.py and linear_loss.py as top-level modules
    from _common import acc_dtype, acc_scalar, acc_types
    from linear_loss import linear_loss_chunks


@triton.jit
def _lce_rows_kernel(x_ptr, t_ptr, rowloss_ptr, V, scale: tl.float64, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    """One program per row of V logits: online max / sum of exp, then the gradient over the row."""
    scale = acc_scalar(scale, ACC)
    r = tl.program_id(0).to(tl.int64)
    row = x_ptr + r * V
    t = tl.load(t_ptr + r)
    m = tl.full([BLOCK_V], float("-inf"), ACC)
    s = tl.zeros([BLOCK_V], dtype=ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, x)
        # lanes that have seen only -inf (padding) shift by 0 instead: exp(-inf) = 0, no inf - inf
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    mx = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - mx), axis=0)
    lse = mx + tl.log(total)
    xt = tl.load(row + t).to(ACC)
    tl.store(rowloss_ptr + r, (lse - xt).to(tl.float64))
    if WRITE_GRAD:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cm = cols < V
            x = tl.load(row + cols, mask=cm, other=0.0).to(ACC)
            g = (tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)) * scale
            tl.store(row + cols, g.to(x_ptr.dtype.element_ty), mask=cm)


def _rows(logits, target, scale, write_grad, row_loss):
    R, V = logits.shape
    if R == 0:
        return
    acc_tl, _ = acc_types(logits.dtype)
    BLOCK_V = min(triton.next_power_of_2(max(V, 1)), 4096 if logits.device.type == "cpu" else 1024)
    with torch.cuda.device_of(logits):
        _lce_rows_kernel[(R,)](logits, target, row_loss, V, float(scale), WRITE_GRAD=write_grad, ACC=acc_tl,
                               BLOCK_V=BLOCK_V)


def _check(h, weight, bias, target, chunk_size):
    ok = (h.dim() == 2 and weight.dim() == 2 and h.shape[1] == weight.shape[1] and h.is_floating_point()
          and weight.dtype == h.dtype and target.dim() == 1 and target.shape[0] == h.shape[0]
          and target.dtype == torch.int64 and chunk_size >= 1
          and (bias is None or (bias.shape == (weight.shape[0],) and bias.dtype == h.dtype)))
    if not ok:
        raise ValueError(f"fused_linear_cross_entropy: need h [N, D], weight [V, D] and bias [V] in h's dtype, int64 "
                         f"target [N], chunk_size >= 1; got h {tuple(h.shape)} {h.dtype}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}, target {tuple(target.shape)} {target.dtype}")


def linear_cross_entropy(h, weight, bias, target, ignore_index, reduction, chunk_size, need_h, need_w, need_b):
    """h [N, D], weight [V, D], bias [V]?, target [N] int64. Returns (loss, grad_h, grad_w, grad_b)."""
    _check(h, weight, bias, target, chunk_size)
    if reduction not in (1, 2):
        raise ValueError(f"fused_linear_cross_entropy: unknown reduction {reduction}")
    V = weight.shape[0]
    target = target.contiguous()
    idx = torch.nonzero(target != ignore_index).view(-1)
    n = idx.numel()
    tsel = target.index_select(0, idx)
    if n > 0:
        if V == 0 or bool(((tsel < 0) | (tsel >= V)).any()):
            raise ValueError(f"fused_linear_cross_entropy: a target is out of range [0, {V}) (and is not "
                             f"ignore_index {ignore_index})")
    scale = (1.0 / n if n > 0 else 0.0) if reduction == 1 else 1.0
    row_loss = torch.empty(n, dtype=torch.float64, device=h.device)

    def rows_loss(logits, c0, c1, write_grad):
        _rows(logits, tsel[c0:c1], scale, write_grad, row_loss[c0:c1])

    grad_h, grad_w, grad_b = linear_loss_chunks(h, weight, bias, chunk_size, rows_loss, need_h, need_w, need_b,
                                                rows=idx)
    total = row_loss.sum()
    if reduction == 1:
        total = total / n if n > 0 else torch.full((), float("nan"), dtype=torch.float64, device=h.device)
    return total.to(acc_dtype(h.dtype)), grad_h, grad_w, grad_b


# ---- RMSNorm (Qwen2RMSNorm) -----------------------------------------------------------------

@triton.jit
def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, D, eps: tl.float64, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    eps = acc_scalar(eps, ACC)
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ss = tl.zeros([BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        x = tl.load(x_ptr + r * D + d0 + cols, mask=d0 + cols < D, other=0.0).to(ACC)
        ss += x * x
    rs = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / D + eps)
    tl.store(rstd_ptr + r, rs)
    for d0 in range(0, D, BLOCK_D):
        m = d0 + cols < D
        x = tl.load(x_ptr + r * D + d0 + cols, mask=m, other=0.0)
        n = (x.to(ACC) * rs).to(x_ptr.dtype.element_ty).to(ACC)  # rounded to x's dtype, as the module
        w = tl.load(w_ptr + d0 + cols, mask=m, other=0.0).to(ACC)
        tl.store(y_ptr + r * D + d0 + cols, (w * n).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rms_bwd_kernel(gy_ptr, x_ptr, w_ptr, rstd_ptr, gx_ptr, D, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rs = tl.load(rstd_ptr + r).to(ACC)
    dot = tl.zeros([BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        m = d0 + cols < D
        g = tl.load(gy_ptr + r * D + d0 + cols, mask=m, other=0.0).to(ACC)
        w = tl.load(w_ptr + d0 + cols, mask=m, other=0.0).to(ACC)
        x = tl.load(x_ptr + r * D + d0 + cols, mask=m, other=0.0).to(ACC)
        dot += g * w * x
    c = tl.sum(dot, axis=0) * rs * rs / D
    for d0 in range(0, D, BLOCK_D):
        m = d0 + cols < D
        g = tl.load(gy_ptr + r * D + d0 + cols, mask=m, other=0.0).to(ACC)
        w = tl.load(w_ptr + d0 + cols, mask=m, other=0.0).to(ACC)
        x = tl.load(x_ptr + r * D + d0 + cols, mask=m, other=0.0).to(ACC)
        tl.store(gx_ptr + r * D + d0 + cols, (rs * (g * w - x * c)).to(gx_ptr.dtype.element_ty), mask=m)


def _block_d(D, device):
    return min(triton.next_power_of_2(max(D, 1)), 4096 if device.type == "cpu" else 1024)


def _check_rms(x, weight):
    if not (x.dim() == 2 and weight.dim() == 1 and weight.shape[0] == x.shape[1] and x.is_floating_point()
            and weight.is_floating_point()):
        raise ValueError(f"rms_norm: need floating x [N, D] and weight [D], got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")


def rms_norm(x, weight, eps):
    """x [N, D], weight [D] -> (y (promote(x, weight) dtype), rstd [N] fp32/fp64)."""
    _check_rms(x, weight)
    x, weight = x.contiguous(), weight.contiguous()
    N, D = x.shape
    acc_tl, acc = acc_types(x.dtype)
    y = torch.empty(N, D, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(N, dtype=acc, device=x.device)
    if N > 0:
        with torch.cuda.device_of(x):
            _rms_fwd_kernel[(N,)](x, weight, y, rstd, D, float(eps), ACC=acc_tl, BLOCK_D=_block_d(D, x.device))
    return y, rstd


def rms_norm_backward(grad_y, x, weight, rstd, need_x, need_w):
    """-> (grad_x or [0], grad_w (accumulation dtype) or [0])."""
    _check_rms(x, weight)
    if grad_y.shape != x.shape:
        raise ValueError(f"rms_norm_backward: grad_y must be {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    x, weight, grad_y, rstd = x.contiguous(), weight.contiguous(), grad_y.contiguous(), rstd.contiguous()
    N, D = x.shape
    acc_tl, acc = acc_types(x.dtype)
    gx = torch.empty_like(x) if need_x else x.new_empty(0)
    if need_x and N > 0:
        with torch.cuda.device_of(x):
            _rms_bwd_kernel[(N,)](grad_y, x, weight, rstd, gx, D, ACC=acc_tl, BLOCK_D=_block_d(D, x.device))
    gw = (grad_y.to(acc) * x.to(acc) * rstd[:, None]).sum(0) if need_w else x.new_empty(0, dtype=acc)
    return gx, gw


# ---- SwiGLU (Qwen2MLP's silu(gate) * up) -----------------------------------------------------

@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(ACC)
    s = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(ACC)  # silu rounded to the dtype, as F.silu
    tl.store(y_ptr + offs, (s * u).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(gy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    gy = tl.load(gy_ptr + offs, mask=m, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(ACC)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(du_ptr + offs, (gy * g * s).to(du_ptr.dtype.element_ty), mask=m)
    tl.store(dg_ptr + offs, (gy * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=m)


def _check_swiglu(gate, up):
    if gate.shape != up.shape or gate.dtype != up.dtype or not gate.is_floating_point():
        raise ValueError(f"swiglu: gate and up must be floating tensors of one shape and dtype, got "
                         f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")


def _elementwise_block(device):
    return 1 << 16 if device.type == "cpu" else 1024


def swiglu(gate, up):
    _check_swiglu(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = gate.numel()
    if n > 0:
        B = _elementwise_block(gate.device)
        with torch.cuda.device_of(gate):
            _swiglu_fwd_kernel[(triton.cdiv(n, B),)](gate, up, y, n, ACC=acc_types(gate.dtype)[0], BLOCK=B)
    return y


def swiglu_backward(grad, gate, up):
    _check_swiglu(gate, up)
    if grad.shape != gate.shape:
        raise ValueError(f"swiglu_backward: grad must be {tuple(gate.shape)}, got {tuple(grad.shape)}")
    gate, up, grad = gate.contiguous(), up.contiguous(), grad.to(gate.dtype).contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(gate)
    n = gate.numel()
    if n > 0:
        B = _elementwise_block(gate.device)
        with torch.cuda.device_of(gate):
            _swiglu_bwd_kernel[(triton.cdiv(n, B),)](grad, gate, up, dg, du, n,
                                                     ACC=acc_types(gate.dtype)[0], BLOCK=B)
    return dg, du


# ---- RoPE (transformers' apply_rotary_pos_emb, unsqueeze_dim=1) -------------------------------

@triton.jit
def _rope_kernel(x_ptr, c_ptr, s_ptr, o_ptr, H, L, D, Bc, xs0, xs1, xs2, os0, os1, os2, BACKWARD: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # row (b, head, l)
    l = r % L
    bh = r // L
    hh = bh % H
    b = bh // H
    half = D // 2
    i = tl.arange(0, BLOCK_H)
    m = i < half
    xr = x_ptr + b * xs0 + hh * xs1 + l * xs2
    orow = o_ptr + b * os0 + hh * os1 + l * os2
    base = (tl.where(Bc == 1, 0, b) * L + l) * D
    x1 = tl.load(xr + i, mask=m, other=0.0).to(ACC)
    x2 = tl.load(xr + i + half, mask=m, other=0.0).to(ACC)
    c1 = tl.load(c_ptr + base + i, mask=m, other=0.0).to(ACC)
    c2 = tl.load(c_ptr + base + i + half, mask=m, other=0.0).to(ACC)
    s1 = tl.load(s_ptr + base + i, mask=m, other=0.0).to(ACC)
    s2 = tl.load(s_ptr + base + i + half, mask=m, other=0.0).to(ACC)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(orow + i, o1.to(o_ptr.dtype.element_ty), mask=m)
    tl.store(orow + i + half, o2.to(o_ptr.dtype.element_ty), mask=m)


def _rope_one(x, cos, sin, backward):
    x = x if x.stride(3) == 1 else x.contiguous()
    out = torch.empty_like(x)
    B, H, L, D = x.shape
    if x.numel() > 0:
        with torch.cuda.device_of(x):
            _rope_kernel[(B * H * L,)](x, cos, sin, out, H, L, D, cos.shape[0], x.stride(0), x.stride(1), x.stride(2),
                                       out.stride(0), out.stride(1), out.stride(2), BACKWARD=backward,
                                       ACC=acc_types(x.dtype)[0],
                                       BLOCK_H=triton.next_power_of_2(max(D // 2, 1)))
    return out


def rope(q, k, cos, sin, backward=False):
    """q [B, H, L, D], k [B, Hk, L, D] (last dim contiguous or copied), cos/sin [B or 1, L, D] ->
    (q * cos + rotate_half(q) * sin, same for k), or the transposed rotation when backward."""
    ok = (q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape and q.shape[0] == k.shape[0]
          and q.shape[2:] == k.shape[2:] and cos.shape[0] in (1, q.shape[0]) and cos.shape[1:] == q.shape[2:]
          and q.shape[3] % 2 == 0 and q.dtype == k.dtype)
    if not ok:
        raise ValueError(f"rope: need q [B, H, L, D], k [B, Hk, L, D] (one dtype, D even), cos and sin [B or 1, L, D]; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}")
    cos, sin = cos.to(q.dtype).contiguous(), sin.to(q.dtype).contiguous()
    return _rope_one(q, cos, sin, backward), _rope_one(k, cos, sin, backward)
