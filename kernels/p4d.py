"""Triton kernels for the P4D distillation losses. Imports only torch, triton, _common.py and
linear_loss.py.

    p4d_loss(preds, targets, masks, mask_inner, kinds, betas, flags, weights, mean, log_eps)
        -> (total, losses, grads): the latent + explicit distillation loss over a list of terms
        in one pass. Same contract as torch.ops.rgpt4d.p4d_loss (csrc/p4d/p4d.cpp):
        kinds 0 smooth_l1 (beta), 1 mse, 2 l1; flags bit 1 log space (log(x + log_eps)),
        bit 2 gradient wanted, bit 4 masked (element e valid iff masks[i][(e // mask_inner[i]) %
        masks[i].numel()]); mean divides by the valid count (no valid element: loss 0, gradient 0).
        grads[i] = f_i * dL_i/dpred_i with f_i = weights[i] (1 when it is 0), written in forward.
    linear_loss_fwd / linear_loss_bwd
        The decoder's last Linear fused with the latent loss, chunked over tokens (linear_loss.py's
        driver: torch matmuls for the GEMMs, a Triton kernel for the loss and its gradient over
        each chunk).

Every term is cut into blocks of BLOCK elements, numbered consecutively over the term list; one
launch per term, with the term's tensors as kernel arguments (not addresses in a table: the
interpreter could not remap them and the compiler would lose their alignment). Each program writes
its block's loss sum to its own slot of a float64 `partial` array; a one-program kernel then sums
each term's slots in block order: the result does not depend on scheduling (deterministic, no
atomics).

Arithmetic in the accumulation dtype of _common.py (fp32; fp64 when an input is fp64). Set
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

_FLAG_LOG, _FLAG_GRAD, _FLAG_MASK = 1, 2, 4


@triton.jit
def _loss_and_grad(d, beta, kind):
    """Elementwise loss and d loss / d d for kind 0 smooth_l1 (beta > 0), 1 mse, 2 l1."""
    ad = tl.abs(d)
    smooth = tl.where(ad < beta, 0.5 * d * d / beta, ad - 0.5 * beta)
    loss = tl.where(kind == 0, smooth, tl.where(kind == 1, d * d, ad))
    sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    smooth_g = tl.minimum(tl.maximum(d / beta, -1.0), 1.0)
    grad = tl.where(kind == 0, smooth_g, tl.where(kind == 1, 2.0 * d, sign))
    return loss, grad


@triton.jit
def _p4d_terms_kernel(p_ptr, t_ptr, m_ptr, g_ptr, beta_ptr, scale_ptr, partial_ptr, term, numel, inner, period,
                      first, log_eps: tl.float64, KIND: tl.constexpr, LOG: tl.constexpr, GRAD: tl.constexpr,
                      MASK: tl.constexpr, FULL_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One block of one term: its loss sum into partial[first + block], its gradient into g."""
    blk = tl.program_id(0).to(tl.int64)
    beta = tl.load(beta_ptr + term).to(ACC)
    scale = tl.load(scale_ptr + term).to(ACC)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    p = tl.load(p_ptr + offs, mask=inb, other=1.0).to(ACC)
    t = tl.load(t_ptr + offs, mask=inb, other=1.0).to(ACC)
    valid = inb
    if MASK:
        if FULL_MASK:  # one mask element per prediction element
            midx = offs
        else:
            midx = (offs // inner) % period
        mv = tl.load(m_ptr + midx, mask=inb, other=0)
        valid = valid & (mv != 0)
    chain = tl.full([BLOCK], 1.0, ACC)
    if LOG:
        eps = acc_scalar(log_eps, ACC)
        pe = p + eps
        chain = 1.0 / pe
        p = tl.log(pe)
        t = tl.log(t + eps)
    loss, grad = _loss_and_grad(p - t, beta, KIND)
    loss = tl.where(valid, loss, 0.0)
    tl.store(partial_ptr + first + blk, tl.sum(loss, axis=0).to(tl.float64))
    if GRAD:
        g = tl.where(valid, grad * chain * scale, 0.0)
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _p4d_finalize_kernel(partial_ptr, ranges_ptr, counts_ptr, weights_ptr, losses_ptr, total_ptr, n_terms,
                         MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """One program: each term's block sums in block order -> losses[i]; total = sum w_i losses[i]."""
    total = tl.zeros([1], dtype=tl.float64)
    for i in range(0, n_terms):
        b0 = tl.load(ranges_ptr + 2 * i)
        b1 = tl.load(ranges_ptr + 2 * i + 1)
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for j in range(b0, b1, BLOCK):
            idx = j + tl.arange(0, BLOCK)
            acc += tl.load(partial_ptr + idx, mask=idx < b1, other=0.0)
        s = tl.sum(acc, axis=0)
        cnt = tl.load(counts_ptr + i)
        if MEAN:
            s = s / tl.maximum(cnt, 1).to(tl.float64)
        s = tl.where(cnt > 0, s, 0.0)
        tl.store(losses_ptr + i, s.to(losses_ptr.dtype.element_ty))
        total += tl.load(weights_ptr + i) * s
    tl.store(total_ptr + tl.arange(0, 1), total.to(total_ptr.dtype.element_ty))


@triton.jit
def _linear_rows_kernel(y_ptr, t_ptr, m_ptr, rs_ptr, scale_ptr, rowloss_ptr, R, D, beta: tl.float64,
                        KIND: tl.constexpr, HAS_MASK: tl.constexpr, HAS_RS: tl.constexpr,
                        WRITE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [R, D] of the projection: row loss sums, and the gradient written over y."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    valid_r = rmask
    if HAS_MASK:
        valid_r = valid_r & (tl.load(m_ptr + rows, mask=rmask, other=0) != 0)
    beta = acc_scalar(beta, ACC)
    rs = tl.full([BLOCK_R], 1.0, ACC) * tl.load(scale_ptr).to(ACC)
    if HAS_RS:
        rs = rs * tl.load(rs_ptr + rows, mask=rmask, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_R], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = rmask[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        y = tl.load(y_ptr + offs, mask=m2, other=0.0).to(ACC)
        t = tl.load(t_ptr + offs, mask=m2, other=0.0).to(ACC)
        loss, grad = _loss_and_grad(y - t, beta, KIND)
        ok = valid_r[:, None] & m2
        acc += tl.sum(tl.where(ok, loss, 0.0), axis=1)
        if WRITE_GRAD:
            g = tl.where(ok, grad * rs[:, None], 0.0)
            tl.store(y_ptr + offs, g.to(y_ptr.dtype.element_ty), mask=m2)
    tl.store(rowloss_ptr + rows, acc.to(tl.float64), mask=rmask)


# ---- host wrappers ------------------------------------------------------------------------

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _device_table(values, dtype, device):
    """A small per-call table on `device`; pinned + asynchronous on a GPU (no host sync)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _term_block(device):
    # The interpreter runs one program at a time in Python: few, large blocks. On a GPU 2048 elements per
    # program (8 warps, 8 per thread): 4096 spilled 4 B on sm_90 with Triton 3.6 (python -m
    # tests.ops.triton_sm90 --family p4d).
    return 1 << 15 if device.type == "cpu" else 2048


def _check_terms(preds, targets, masks, mask_inner, kinds, betas, flags, weights):
    """The checks that keep the kernel inside its tensors (callers may skip the friendlier ones)."""
    n = len(preds)
    if n < 1 or not all(len(x) == n for x in (targets, masks, mask_inner, kinds, betas, flags, weights)):
        raise ValueError("p4d_loss: needs at least one term and one entry per term in every list")
    for i, (p, t) in enumerate(zip(preds, targets)):
        if p.shape != t.shape or p.device != preds[0].device or t.device != p.device:
            raise ValueError(f"p4d_loss: term {i}: prediction {tuple(p.shape)} and target {tuple(t.shape)} must have "
                             f"the same shape, on one device")
        if p.dtype not in _TL or t.dtype not in _TL:
            raise TypeError(f"p4d_loss: term {i}: unsupported dtypes {p.dtype}, {t.dtype}")
        if kinds[i] not in (0, 1, 2) or betas[i] < 0:
            raise ValueError(f"p4d_loss: term {i}: unknown kind {kinds[i]} or negative beta {betas[i]}")
        if flags[i] & _FLAG_MASK and p.numel() > 0:
            m, inner = masks[i], mask_inner[i]
            if m.dtype != torch.bool or m.device != p.device or inner < 1 or m.numel() < 1 or \
                    p.numel() % (inner * m.numel()) != 0:
                raise ValueError(f"p4d_loss: term {i}: a bool mask of {m.numel()} elements repeated every {inner} "
                                 f"elements does not tile the prediction's {p.numel()} elements")


def p4d_loss(preds, targets, masks, mask_inner, kinds, betas, flags, weights, mean, log_eps):
    _check_terms(preds, targets, masks, mask_inner, kinds, betas, flags, weights)
    n = len(preds)
    device = preds[0].device
    out_dtype = acc_dtype(*(x.dtype for x in preds + targets))
    preds = [p.contiguous() for p in preds]
    targets = [t.contiguous() for t in targets]
    grads = [torch.empty(p.shape, dtype=p.dtype, device=device) if flags[i] & _FLAG_GRAD else p.new_empty((0,))
             for i, p in enumerate(preds)]
    masks = [m.contiguous() if flags[i] & _FLAG_MASK else m for i, m in enumerate(masks)]
    kinds = [2 if (k == 0 and b == 0) else k for k, b in zip(kinds, betas)]  # beta 0: l1, as torch
    betas = [b if (k == 0 and b > 0) else 1.0 for k, b in zip(kinds, betas)]

    # Valid counts and gradient scales, on the device (no host sync).
    count_parts = []
    for i, p in enumerate(preds):
        if flags[i] & _FLAG_MASK and p.numel() > 0:
            count_parts.append((torch.count_nonzero(masks[i]) * (p.numel() // masks[i].numel())).reshape(1))
        else:
            count_parts.append(torch.full((1,), 0 if flags[i] & _FLAG_MASK else p.numel(), dtype=torch.int64,
                                          device=device))
    counts = torch.cat(count_parts)
    factors = _device_table([w if w != 0 else 1.0 for w in weights], torch.float64, device)
    scales = factors / counts.clamp(min=1).to(torch.float64) if mean else factors
    beta_t = _device_table(betas, torch.float64, device)

    BLOCK = _term_block(device)
    nblk = [triton.cdiv(p.numel(), BLOCK) for p in preds]
    # One launch per term, its tensors passed as arguments; its blocks write partial[first:first + nblk]
    # (terms numbered consecutively), which the finalize kernel sums in block order.
    ranges = [[0, 0] for _ in range(n)]
    partial = torch.zeros(max(1, sum(nblk)), dtype=torch.float64, device=device)
    first = 0
    for i in range(n):
        ranges[i] = [first, first + nblk[i]]
        if nblk[i] == 0:
            continue
        p, t = preds[i], targets[i]
        masked, grad = bool(flags[i] & _FLAG_MASK), bool(flags[i] & _FLAG_GRAD)
        m = masks[i].view(torch.uint8) if masked else p  # unused pointer when unmasked
        period = masks[i].numel() if masked else 1
        acc_tl, _ = acc_types(p.dtype, t.dtype)
        with torch.cuda.device_of(p):
            _p4d_terms_kernel[(nblk[i],)](
                p, t, m, grads[i] if grad else p, beta_t, scales, partial, i, p.numel(), mask_inner[i], period,
                first, float(log_eps), KIND=kinds[i], LOG=bool(flags[i] & _FLAG_LOG), GRAD=grad, MASK=masked,
                FULL_MASK=masked and mask_inner[i] == 1 and period == p.numel(), ACC=acc_tl, BLOCK=BLOCK,
                num_warps=8)
        first += nblk[i]
    losses = torch.empty(n, dtype=out_dtype, device=device)
    total = torch.empty((), dtype=out_dtype, device=device)
    ranges_t = _device_table(ranges, torch.int64, device)
    weights_t = _device_table(list(weights), torch.float64, device)
    with torch.cuda.device_of(partial):
        # 8 warps: at 4 the fp64 accumulator spilled 16-24 B on sm_90 (python -m tests.ops.triton_sm90 --family p4d)
        _p4d_finalize_kernel[(1,)](partial, ranges_t, counts, weights_t, losses, total, n, MEAN=bool(mean),
                                   BLOCK=1024, num_warps=8)
    return total, losses, grads


def _linear_rows(y, target, mask, row_scale, scale, kind, beta, write_grad, row_loss):
    R, D = y.shape
    if R == 0:
        return
    acc_tl, _ = acc_types(y.dtype, target.dtype)
    BLOCK_D = min(triton.next_power_of_2(max(D, 1)), 1024 if y.device.type == "cpu" else 256)
    BLOCK_R = max(1, min(triton.next_power_of_2(R), (1 << 14 if y.device.type == "cpu" else 2048) // BLOCK_D))
    with torch.cuda.device_of(y):
        _linear_rows_kernel[(triton.cdiv(R, BLOCK_R),)](
            y, target, mask if mask is not None else y, row_scale if row_scale is not None else y, scale, row_loss,
            R, D, float(beta) if (kind == 0 and beta > 0) else 1.0,
            KIND=kind, HAS_MASK=mask is not None, HAS_RS=row_scale is not None, WRITE_GRAD=write_grad, ACC=acc_tl,
            BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)


def _check_linear(h, weight, bias, target, mask, chunk_size, grad_loss=None):
    N = h.shape[0] if h.dim() == 2 else -1
    ok = (h.dim() == 2 and weight.dim() == 2 and weight.shape[1] == h.shape[1] and weight.dtype == h.dtype
          and tuple(target.shape) == (N, weight.shape[0]) and chunk_size >= 1
          and (bias is None or tuple(bias.shape) == (weight.shape[0],))
          and (mask is None or (mask.dtype == torch.bool and tuple(mask.shape) == (N,)))
          and (grad_loss is None or tuple(grad_loss.shape) == (N,)))
    if not ok:
        raise ValueError(f"fused_linear_latent_loss: need h [N, D_in], weight [D_out, D_in] (h's dtype), bias [D_out], "
                         f"target [N, D_out], bool mask [N], chunk_size >= 1; got h {tuple(h.shape)}, weight "
                         f"{tuple(weight.shape)}, target {tuple(target.shape)}")


def linear_loss_fwd(h, weight, bias, target, mask, kind, beta, reduction, chunk_size, need_h, need_w, need_b):
    """h [N, D_in], weight [D_out, D_in], bias [D_out]?, target [N, D_out], mask [N] bool?.
    reduction 0 none (per-token loss, no gradients), 1 mean, 2 sum (gradients computed here).
    Returns (loss, grad_h or [0], grad_w (fp32/fp64) or [0], grad_b or [0])."""
    _check_linear(h, weight, bias, target, mask, chunk_size)
    kind = 2 if (kind == 0 and beta == 0) else kind
    N, D_out = h.shape[0], weight.shape[0]
    acc = acc_dtype(h.dtype)
    target = target.contiguous()
    mask = mask.contiguous() if mask is not None else None
    row_loss = torch.empty(N, dtype=torch.float64, device=h.device)
    valid = torch.count_nonzero(mask) if mask is not None else torch.full((), N, dtype=torch.int64, device=h.device)
    count = valid.to(torch.float64) * D_out
    scale = (1.0 / count.clamp(min=1)).to(acc) if reduction == 1 else torch.ones((), dtype=acc, device=h.device)

    def rows_loss(y, c0, c1, write_grad):
        _linear_rows(y, target[c0:c1], None if mask is None else mask[c0:c1], None, scale, kind, beta, write_grad,
                     row_loss[c0:c1])

    grads_now = reduction != 0
    grad_h, grad_w, grad_b = linear_loss_chunks(h, weight, bias, chunk_size, rows_loss, need_h and grads_now,
                                                need_w and grads_now, need_b and grads_now)
    if reduction == 0:
        loss = (row_loss / max(D_out, 1)).to(acc)
    else:
        total = row_loss.sum()
        if reduction == 1:
            total = total / count.clamp(min=1)
        loss = total.to(acc)
    return loss, grad_h, grad_w, grad_b


def linear_loss_bwd(grad_loss, h, weight, bias, target, mask, kind, beta, chunk_size, need_h, need_w, need_b):
    """reduction none: recompute each chunk's projection and scale its loss gradient by the
    per-token grad_output. Returns (grad_h or [0], grad_w (acc) or [0], grad_b (acc) or [0])."""
    _check_linear(h, weight, bias, target, mask, chunk_size, grad_loss)
    kind = 2 if (kind == 0 and beta == 0) else kind
    N, D_out = h.shape[0], weight.shape[0]
    acc = acc_dtype(h.dtype)
    target = target.contiguous()
    mask = mask.contiguous() if mask is not None else None
    row_scale = grad_loss.to(acc).contiguous()
    scale = torch.full((), 1.0 / max(D_out, 1), dtype=acc, device=h.device)
    row_loss = torch.empty(min(chunk_size, N), dtype=torch.float64, device=h.device)  # scratch: not returned

    def rows_loss(y, c0, c1, write_grad):
        _linear_rows(y, target[c0:c1], None if mask is None else mask[c0:c1], row_scale[c0:c1], scale, kind, beta,
                     write_grad, row_loss[:c1 - c0])

    return linear_loss_chunks(h, weight, bias, chunk_size, rows_loss, need_h, need_w, need_b, need_loss=False)
