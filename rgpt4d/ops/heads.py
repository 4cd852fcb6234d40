"""Output stage of the dense (DPT-like) heads: pixel shuffle with the head's activation, one op.

    pixel_shuffle_act(x, upscale, activation="none" | "exp", clamp_max=20.0)
        == F.pixel_shuffle(x, upscale), then torch.exp(y.clamp(max=clamp_max)) for "exp"

The teacher's heads (rgpt4d.models.teacher.DPTHead) end with a learned pixel shuffle to pixels and,
for depth, exp(clamp(., max=20)); in P4D they run on every step (frozen), forward and backward. The
compiled backends do the shuffle as one strided gather (the heads' convolutions give channels-last
maps, read in place) and its backward as one scatter into the input's layout; the exp activation
keeps only the input for backward (the eager composition keeps the input for the clamp and the
output for the exp). Backends: eager (F.pixel_shuffle and torch ops), cpu / cuda (csrc/heads/),
triton (kernels/heads.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rgpt4d.ops.registry import Family, refuse_double_backward

ACTIVATIONS = {"none": 0, "exp": 1}


def pixel_shuffle_act_eager(x: Tensor, upscale: int, activation: str = "none", clamp_max: float = 20.0) -> Tensor:
    """F.pixel_shuffle, then exp(clamp(max=clamp_max)) for "exp": the teacher head's own code."""
    y = F.pixel_shuffle(x, upscale)
    return torch.exp(y.clamp(max=clamp_max)) if activation == "exp" else y


# ---------------------------------------------------------------------------------------------
# Declaration (csrc/heads/ and kernels/heads.py implement it)
# ---------------------------------------------------------------------------------------------


def _fake(x, upscale, activation, clamp_max):
    N, Cr, H, W = x.shape
    return x.new_empty((N, Cr // (upscale * upscale), H * upscale, W * upscale))


def _fake_backward(grad, x, upscale, activation, clamp_max):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, upscale, activation, clamp_max = inputs
    ctx.cfg = (upscale, activation, clamp_max)
    # exp: x itself (the activation's gradient is recomputed from it); none: nothing is kept
    ctx.save_for_backward(x if activation == 1 else None)
    ctx.x_geom = (tuple(x.shape), tuple(x.stride()), x.dtype, x.device)


def _backward(ctx, grad):
    refuse_double_backward("pixel_shuffle_act", grad)
    (x,) = ctx.saved_tensors
    upscale, activation, clamp_max = ctx.cfg
    if x is None:  # no activation: only the input's shape and layout matter (an uninitialised stand-in)
        shape, stride, dtype, device = ctx.x_geom
        x = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    return ctx.ops.pixel_shuffle_act_backward(grad, x, upscale, activation, clamp_max), None, None, None


HEADS = Family("heads")
PIXEL_SHUFFLE_ACT = HEADS.op("pixel_shuffle_act", "(Tensor x, int upscale, int activation, float clamp_max) -> Tensor",
                             fake=_fake, triton=lambda K, *a: K.pixel_shuffle_act(*a), autograd=(_setup, _backward))
HEADS.op("pixel_shuffle_act_backward",
         "(Tensor grad, Tensor x, int upscale, int activation, float clamp_max) -> Tensor",
         fake=_fake_backward, triton=lambda K, *a: K.pixel_shuffle_act_backward(*a))


def pixel_shuffle_act(x: Tensor, upscale: int, activation: str = "none", clamp_max: float = 20.0, *,
                      backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """F.pixel_shuffle(x, upscale) ([N, C*r*r, H, W] -> [N, C, H*r, W*r]) with the head's activation:
    "none", or "exp" = exp(min(y, clamp_max)) (the depth head's metres). x may be channels-last."""
    op = "pixel_shuffle_act"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if validate:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{op}: x must be a floating-point tensor")
        if not isinstance(upscale, int) or upscale < 1:
            raise ValueError(f"{op}: upscale must be a positive int, got {upscale!r}")
        if x.dim() != 4 or x.shape[1] % (upscale * upscale):
            raise ValueError(f"{op}: x must be [N, C*r*r, H, W] with channels a multiple of upscale^2 = "
                             f"{upscale * upscale}, got {tuple(x.shape)}")
    be = PIXEL_SHUFFLE_ACT.select(x.device, backend)
    if be == "eager":
        return pixel_shuffle_act_eager(x, upscale, activation, clamp_max)
    return PIXEL_SHUFFLE_ACT(be, x, int(upscale), ACTIVATIONS[activation], float(clamp_max))
