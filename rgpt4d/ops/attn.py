"""Attention for short sequences: softmax(scale * q k^T + mask) v with grouped-query heads.

    attention(q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], mask=None, *, causal=False, scale=None)
        == F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=Hq != Hkv)

The student's attention: its SigLIP vision tower runs T frames of g*g patches each (batch B*T,
sequence g*g), its Qwen2 LLM a prompt of a few hundred tokens with grouped-query heads. At those
sizes torch's CPU flash kernel spends most of its time outside arithmetic (its backward in
particular); the CPU kernel here (csrc/attn/attn.cpp) packs a block of queries and the head's keys
into padded panels, does Q K^T and P V as register-tiled GEMMs, keeps only the log-sum-exp for
backward and recomputes P there, with one writer per gradient row (deterministic, no atomics).
The output is laid out [B, Lq, Hq, Dv] in memory (the result is its transpose(1, 2) view), which is
the layout the model's output projection reads: transformers' `.transpose(1, 2).contiguous()`
becomes free.

Backends: eager is torch's own F.scaled_dot_product_attention (what a transformers model runs with
attn_implementation="sdpa"), and on CUDA tensors that is also what runs: FlashAttention-2 / cuDNN /
memory-efficient kernels that rgpt4d does not try to replace (for those, see the flash-attn and
xformers attention implementations of rgpt4d.models.attention). cpu: csrc/attn/. There is no
Triton or CUDA kernel for this op: asking for backend="cuda" or "triton" per call raises; a global
backend of "cuda"/"triton" (a GPU run of the whole stack) runs SDPA for it.

Semantics as SDPA's: causal is top-left aligned (query i sees keys j <= i); mask is bool (True =
attend) or additive float, broadcastable to [B, Hq, Lq, Lk]; a query that sees no key gets 0 (and
zero gradients). The mask receives no gradient. No dropout. First-order gradients only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rgpt4d.ops.registry import BackendUnavailableError, Family, acc_dtype, get_backend, refuse_double_backward

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def attention_eager(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, *, causal: bool = False,
                    scale: Optional[float] = None) -> Tensor:
    """torch's F.scaled_dot_product_attention (grouped-query heads through enable_gqa). SDPA refuses a
    mask together with is_causal: then the causal pattern is folded into the mask."""
    if causal and mask is not None:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attention_math(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, *, causal: bool = False,
                   scale: Optional[float] = None) -> Tensor:
    """The definition, op by op (the float64 oracle of the tests): repeat the key/value heads, scores,
    mask, softmax (rows that see no key give 0), weighted sum."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    seen = torch.isfinite(s).any(-1, keepdim=True) if s.shape[-1] else torch.zeros_like(s[..., :1], dtype=torch.bool)
    p = torch.softmax(s.masked_fill(~seen, 0.0), -1) * seen
    return torch.matmul(p, v)


# ---------------------------------------------------------------------------------------------
# autograd for the compiled op (declared in csrc/attn/attn.cpp)
# ---------------------------------------------------------------------------------------------


def _fake(q, k, v, mask, scale, causal):
    B, H, L, _ = q.shape
    return q.new_empty((B, L, H, v.shape[-1])), q.new_empty((B, H, L), dtype=acc_dtype(q.dtype))


def _fake_backward(grad_out, q, k, v, mask, out, lse, scale, causal, need_q, need_kv):
    e = q.new_empty((0,))
    return (torch.empty_like(q) if need_q else e, torch.empty_like(k) if need_kv else e,
            torch.empty_like(v) if need_kv else e)


def _setup(ctx, inputs, output):
    q, k, v, mask, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.cfg = (scale, causal)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _glse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    scale, causal = ctx.cfg
    need_q = ctx.needs_input_grad[0]
    need_kv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    if grad_out is None or not (need_q or need_kv):
        return None, None, None, None, None, None
    refuse_double_backward("attention", grad_out)
    dq, dk, dv = ctx.ops.attention_backward(grad_out, q, k, v, mask, out, lse, scale, causal, need_q, need_kv)
    return (dq if need_q else None, dk if ctx.needs_input_grad[1] else None,
            dv if ctx.needs_input_grad[2] else None, None, None, None)


# CPU only: on CUDA tensors the automatic choice is eager (SDPA), see the module docstring.
ATTN = Family("attn", cuda_preference=())
ATTENTION = ATTN.op("attention",
                    "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal) -> (Tensor, Tensor)",
                    fake=_fake, autograd=(_setup, _backward), backends=("eager", "cpu"))
ATTN.op("attention_backward", "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor out, Tensor lse, "
        "float scale, bool causal, bool need_q, bool need_kv) -> (Tensor, Tensor, Tensor)", fake=_fake_backward,
        backends=("eager", "cpu"))


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------


def _validate(q, k, v, mask, scale) -> None:
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{op}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{op}: k and v must have q's batch size {B}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"{op}: k must have q's head size {D} (last dim), got k {tuple(k.shape)}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: v must have k's heads and length [B, {k.shape[1]}, {k.shape[2]}, Dv], got "
                         f"{tuple(v.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"{op}: q's heads ({Hq}) must be a multiple of k's and v's heads ({k.shape[1]})")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{op}: mask must be a tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"{op}: mask must be bool (True = attend) or floating point (additive), got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"{op}: mask must be on q's device {q.device}, got {mask.device}")
        if mask.requires_grad:
            raise ValueError(f"{op}: mask receives no gradient; pass mask.detach()")
        target = (B, Hq, Lq, k.shape[2])
        try:
            ok = mask.dim() <= 4 and torch.broadcast_shapes(tuple(mask.shape), target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{op}: mask must broadcast to [B, Hq, Lq, Lk] = {list(target)}, got {tuple(mask.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")


def attention_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """The backend attention runs with on `device`: backend= (checked as every op's), else the
    process-wide one, except that a process-wide "cuda"/"triton" and, by default, CUDA tensors run
    SDPA ("eager"); cpu on CPU tensors by default."""
    device = torch.device(device)
    requested = backend
    if requested is None:
        requested = get_backend()
        if requested in ("cuda", "triton") or (requested is None and device.type != "cpu"):
            requested = "eager"  # a GPU run of the whole stack: SDPA's own fused kernels
    return ATTENTION.select(device, requested)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, *, causal: bool = False,
              scale: Optional[float] = None, backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """softmax(scale * q k^T + mask) v -> [B, Hq, Lq, Dv] (as F.scaled_dot_product_attention with
    enable_gqa). q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], Hq a multiple of Hkv; scale
    defaults to 1/sqrt(D); mask bool (True = attend) or additive, broadcastable to [B, Hq, Lq, Lk].
    With the cpu backend the result is a transpose(1, 2) view of a contiguous [B, Lq, Hq, Dv] tensor."""
    if validate:
        _validate(q, k, v, mask, scale)
    if backend in ("cuda", "triton"):
        raise BackendUnavailableError(
            f"attention: rgpt4d has no {backend} kernel for attention; on CUDA tensors use the default "
            "(backend=None or 'eager': torch's scaled_dot_product_attention, i.e. FlashAttention-2 / cuDNN)")
    be = attention_backend(q.device, backend)
    if be == "eager":
        return attention_eager(q, k, v, mask, causal=causal, scale=scale)
    s = 1.0 / math.sqrt(max(q.shape[-1], 1)) if scale is None else float(scale)
    out, _ = ATTENTION(be, q, k, v, mask, s, bool(causal))
    return out.transpose(1, 2)
