"""The chunked "Linear + loss" driver of the LM cross-entropy (lm.py) and the P4D latent loss
(p4d.py). Imports only torch and _common.py.

    linear_loss_chunks(h, weight, bias, chunk_size, rows_loss, need_h, need_w, need_b, rows=None,
                       need_loss=True) -> (grad_h or [0], grad_w or [0], grad_b or [0])
        h [N, D_in], weight [D_out, D_in], bias [D_out] or None. The rows of h listed in `rows`
        (an int64 index tensor; all N rows when None) are taken chunk_size at a time:
            y = h_c weight^T + bias                        (torch matmul)
            rows_loss(y, c0, c1, write_grad)               (the loss's Triton launch)
        where rows_loss writes the row losses of selected rows c0..c1 wherever it keeps them and,
        when write_grad, overwrites y with dL/dy. Then
            grad_h[rows_c] = dL/dy weight                  (h's dtype; rows not selected are 0)
            grad_w += dL/dy^T h_c,  grad_b += dL/dy^T 1    (accumulation dtype, _common.acc_dtype)
        Only one chunk of y ([chunk_size, D_out]) exists at a time: the logits of a 150K vocabulary
        are never materialised for all tokens. grad_b is a GEMV (no reduction kernel: deterministic).
        need_b is ignored without a bias; with need_loss False and no gradient wanted nothing runs.
"""

import torch

try:  # installed as rgpt4d.kernels
    from ._common import acc_dtype
except ImportError:  # copied next to _common.py as top-level modules
    from _common import acc_dtype


def linear_loss_chunks(h, weight, bias, chunk_size, rows_loss, need_h, need_w, need_b, rows=None, need_loss=True):
    N, D_in = h.shape
    D_out = weight.shape[0]
    acc = acc_dtype(h.dtype)
    dev = h.device
    h, weight = h.contiguous(), weight.contiguous()
    need_b = need_b and bias is not None
    if not need_h:
        grad_h = h.new_empty(0)
    elif rows is None:  # every row is written by a chunk
        grad_h = torch.empty(N, D_in, dtype=h.dtype, device=dev)
    else:
        grad_h = torch.zeros(N, D_in, dtype=h.dtype, device=dev)
    grad_w = torch.zeros(D_out, D_in, dtype=acc, device=dev) if need_w else h.new_empty(0, dtype=acc)
    grad_b = torch.zeros(D_out, dtype=acc, device=dev) if need_b else h.new_empty(0, dtype=acc)
    write_grad = need_h or need_w or need_b
    if not (write_grad or need_loss):
        return grad_h, grad_w, grad_b
    n = N if rows is None else rows.numel()
    for c0 in range(0, n, chunk_size):
        c1 = min(n, c0 + chunk_size)
        h_c = h[c0:c1] if rows is None else h.index_select(0, rows[c0:c1])
        y = (torch.addmm(bias, h_c, weight.t()) if bias is not None else torch.mm(h_c, weight.t())).contiguous()
        rows_loss(y, c0, c1, write_grad)
        if not write_grad:
            continue
        if need_h:
            if rows is None:
                torch.mm(y, weight, out=grad_h[c0:c1])
            else:
                grad_h.index_copy_(0, rows[c0:c1], torch.mm(y, weight))
        if need_w or need_b:
            y_acc = y.to(acc)
            if need_w:
                grad_w.addmm_(y_acc.t(), h_c.to(acc))
            if need_b:
                grad_b.addmv_(y_acc.t(), torch.ones(c1 - c0, dtype=acc, device=dev))
    return grad_h, grad_w, grad_b
