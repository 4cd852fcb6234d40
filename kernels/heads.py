"""Triton kernels for the output stage of the teacher's dense heads. Imports only torch and triton.

    pixel_shuffle_act(x, upscale, activation, clamp_max) -> y
        F.pixel_shuffle(x, upscale) ([N, C*r*r, H, W] -> [N, C, H*r, W*r], x read with its own
        strides, y contiguous), then exp(min(y, clamp_max)) for activation 1. Same contract as
        torch.ops.rgpt4d.pixel_shuffle_act (csrc/heads/heads.cpp).
    pixel_shuffle_act_backward(grad, x, upscale, activation, clamp_max) -> grad_x (x's layout)

The shuffle is one program per block of output elements (int64 indexing); the activation uses torch
ops. Set TRITON_INTERPRET=1 before importing this file to run the kernels on CPU tensors.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _shuffle_kernel(big_ptr, small_ptr, s0, s1, s2, s3, C, H, W, r, total, FORWARD: tl.constexpr,
                    BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < total
    OW = W * r
    OH = H * r
    ow = e % OW
    q = e // OW
    oh = q % OH
    nc = q // OH
    c = nc % C
    n = nc // C
    src = n * s0 + (c * r * r + (oh % r) * r + ow % r) * s1 + (oh // r) * s2 + (ow // r) * s3
    if FORWARD:
        tl.store(big_ptr + e, tl.load(small_ptr + src, mask=m), mask=m)
    else:
        tl.store(small_ptr + src, tl.load(big_ptr + e, mask=m), mask=m)


def _check(x, r, activation):
    if not (x.dim() == 4 and x.is_floating_point() and r >= 1 and x.shape[1] % (r * r) == 0
            and activation in (0, 1)):
        raise ValueError(f"pixel_shuffle_act: need a floating x [N, C*r*r, H, W], upscale r >= 1 and activation 0 "
                         f"or 1, got {tuple(x.shape)} and r = {r}")


def _run(big, small, strides, N, C, H, W, r, forward):
    total = N * C * H * r * W * r
    if total == 0:
        return
    BLOCK = 1 << 16 if big.device.type == "cpu" else 1024
    with torch.cuda.device_of(big):
        _shuffle_kernel[(triton.cdiv(total, BLOCK),)](big, small, *strides, C, H, W, r, total, FORWARD=forward,
                                                      BLOCK=BLOCK)


def pixel_shuffle_act(x, r, activation, clamp_max):
    _check(x, r, activation)
    N, Cr, H, W = x.shape
    C = Cr // (r * r)
    y = torch.empty(N, C, H * r, W * r, dtype=x.dtype, device=x.device)
    _run(y, x, x.stride(), N, C, H, W, r, True)
    if activation == 1:
        y.clamp_(max=clamp_max).exp_()
    return y


def pixel_shuffle_act_backward(grad, x, r, activation, clamp_max):
    _check(x, r, activation)
    N, Cr, H, W = x.shape
    C = Cr // (r * r)
    if tuple(grad.shape) != (N, C, H * r, W * r):
        raise ValueError(f"pixel_shuffle_act_backward: grad must be {(N, C, H * r, W * r)}, got {tuple(grad.shape)}")
    g = grad.to(x.dtype).contiguous()
    gx = torch.empty_like(x)
    _run(g, gx, gx.stride(), N, C, H, W, r, False)
    if activation == 1:
        gx.mul_(x.clamp(max=clamp_max).exp_().mul_(x <= clamp_max))
    return gx
