"""Triton kernels for the language-model head. Imports only torch and triton.

    linear_cross_entropy(h, weight, bias, target, ignore_index, reduction, chunk_size,
                         need_h, need_w, need_b) -> (loss, grad_h or [0], grad_w or [0], grad_b or [0])
        The LM head's Linear fused with the cross-entropy of its logits. Same contract as
        torch.ops.rgpt4d.linear_cross_entropy (csrc/lm/lm.cpp): only the rows whose target is not
        ignore_index are projected, chunk_size rows at a time (torch matmuls for the GEMMs), and a
        Triton kernel turns each chunk of logits into the row losses and, in place, the gradient
        scale * (softmax - onehot). reduction 1 mean (NaN when no row is selected, as
        F.cross_entropy), 2 sum. grad_w / grad_b are in the accumulation dtype (fp32; fp64 for
        fp64 inputs).

Arithmetic in fp32 (fp64 for fp64 inputs). Set TRITON_INTERPRET=1 before importing this file to
run the kernels on CPU tensors.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _lce_rows_kernel(x_ptr, t_ptr, rowloss_ptr, V, scale, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    """One program per row of V logits: online max / sum of exp, then the gradient over the row."""
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


_TL_ACC = {torch.float64: tl.float64}


def _rows(logits, target, scale, write_grad, row_loss):
    R, V = logits.shape
    if R == 0:
        return
    acc = _TL_ACC.get(logits.dtype, tl.float32)
    BLOCK_V = min(triton.next_power_of_2(max(V, 1)), 4096 if logits.device.type == "cpu" else 1024)
    _lce_rows_kernel[(R,)](logits, target, row_loss, V, float(scale), WRITE_GRAD=write_grad, ACC=acc,
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
    N, D = h.shape
    V = weight.shape[0]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    h, weight, target = h.contiguous(), weight.contiguous(), target.contiguous()
    need_b = need_b and bias is not None
    grad_h = torch.zeros(N, D, dtype=h.dtype, device=h.device) if need_h else h.new_empty(0)
    grad_w = torch.zeros(V, D, dtype=acc, device=h.device) if need_w else h.new_empty(0, dtype=acc)
    grad_b = torch.zeros(V, dtype=acc, device=h.device) if need_b else h.new_empty(0, dtype=acc)
    write_grad = need_h or need_w or need_b
    idx = torch.nonzero(target != ignore_index).view(-1)
    n = idx.numel()
    tsel = target.index_select(0, idx)
    if n > 0:
        if V == 0 or bool(((tsel < 0) | (tsel >= V)).any()):
            raise ValueError(f"fused_linear_cross_entropy: a target is out of range [0, {V}) (and is not "
                             f"ignore_index {ignore_index})")
    scale = (1.0 / n if n > 0 else 0.0) if reduction == 1 else 1.0
    row_loss = torch.empty(n, dtype=torch.float64, device=h.device)
    for c0 in range(0, n, chunk_size):
        c1 = min(n, c0 + chunk_size)
        ic = idx[c0:c1]
        h_c = h.index_select(0, ic)
        logits = (torch.addmm(bias, h_c, weight.t()) if bias is not None else torch.mm(h_c, weight.t())).contiguous()
        _rows(logits, tsel[c0:c1].contiguous(), scale, write_grad, row_loss[c0:c1])
        if not write_grad:
            continue
        if need_h:
            grad_h.index_copy_(0, ic, torch.mm(logits, weight))
        g_acc = logits.to(acc)
        if need_w:
            grad_w.addmm_(g_acc.t(), h_c.to(acc))
        if need_b:  # G^T 1 as a GEMV: deterministic
            grad_b.addmv_(g_acc.t(), torch.ones(c1 - c0, dtype=acc, device=h.device))
    total = row_loss.sum()
    if reduction == 1:
        total = total / n if n > 0 else torch.full((), float("nan"), dtype=torch.float64, device=h.device)
    return total.to(acc), grad_h, grad_w, grad_b
