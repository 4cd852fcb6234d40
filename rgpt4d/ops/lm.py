"""Language-model head ops: the LM head's Linear fused with the cross-entropy of its logits.

    fused_linear_cross_entropy(h [..., D], weight [V, D], target [...], bias=None)
        == F.cross_entropy(F.linear(h, weight, bias).float().view(-1, V), target.view(-1),
                           ignore_index=-100, reduction="mean")

what a causal LM computes for its SFT loss (transformers' ForCausalLMLoss, after the labels are
shifted), without the [N, V] logits and their gradient ever existing whole:

- only the rows whose target is not `ignore_index` are projected (SFT labels cover the answer
  tokens only: a prompt of hundreds of tokens has a handful of labelled ones, and the logits of
  the others are never needed in training);
- those rows are projected `chunk_size` at a time; each chunk's logits become, in place, the
  gradient of the loss with respect to them (softmax - onehot, scaled by 1/n for the mean), from
  which grad_h rows (G W) and grad_W (G^T h) are two GEMMs;
- the gradients are computed in forward; the backward only scales them by grad_output (a
  scalar), or returns them as they are when it is exactly 1 (the usual `loss.backward()`).

Backends: eager (this file: the unfused composition, the oracle), cpu / cuda (csrc/lm/),
triton (kernels/lm.py). The CUDA and Triton paths select the rows with `nonzero`: one host sync
per call. Double backward is not supported by the fused backends (first-order gradients only).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgpt4d.ops.registry import Family, acc_dtype, grads_from_forward, refuse_double_backward

REDUCTIONS = {"mean": 1, "sum": 2}
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Eager reference
# ---------------------------------------------------------------------------------------------


def fused_linear_cross_entropy_eager(h: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                                     ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> Tensor:
    """Linear then cross-entropy, unfused, exactly as a transformers causal LM computes its loss:
    logits = h @ weight.T + bias for every row, upcast to float32 (float64 stays float64), then
    F.cross_entropy over the rows whose target is not ignore_index."""
    logits = F.linear(h, weight, bias)
    logits = logits.to(acc_dtype(logits.dtype))
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), target.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)


# ---------------------------------------------------------------------------------------------
# Declaration (csrc/lm/ and kernels/lm.py implement it)
# ---------------------------------------------------------------------------------------------


def _fake_linear_cross_entropy(h, weight, bias, target, ignore_index, reduction, chunk_size, need_h_grad,
                               need_w_grad, need_b_grad):
    acc = acc_dtype(h.dtype)
    gh = h.new_empty(h.shape) if need_h_grad else h.new_empty((0,))
    gw = h.new_empty(weight.shape, dtype=acc) if need_w_grad else h.new_empty((0,), dtype=acc)
    gb = (h.new_empty((weight.shape[0],), dtype=acc) if (need_b_grad and bias is not None)
          else h.new_empty((0,), dtype=acc))
    return h.new_empty((), dtype=acc), gh, gw, gb


def _setup(ctx, inputs, output):
    h, weight, bias, *_ = inputs
    _, gh, gw, gb = output
    ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.has_bias = bias is not None
    ctx.numels = (h.numel(), weight.numel(), 0 if bias is None else bias.numel())
    ctx.mark_non_differentiable(gh, gw, gb)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gh, gw, gb)  # released after backward (unless retain_graph)


def _backward(ctx, g_loss, _gh, _gw, _gb):
    if g_loss is None:
        return (None,) * 10
    refuse_double_backward("fused_linear_cross_entropy", g_loss)
    grads = grads_from_forward("fused_linear_cross_entropy", ctx, g_loss, *ctx.saved_tensors)
    return (*grads, None, None, None, None, None, None, None)


LM = Family("lm")
LINEAR_CROSS_ENTROPY = LM.op(
    "linear_cross_entropy", "(Tensor h, Tensor weight, Tensor? bias, Tensor target, int ignore_index, int reduction, "
    "int chunk_size, bool need_h_grad, bool need_w_grad, bool need_b_grad) -> (Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_linear_cross_entropy, triton=lambda K, *a: K.linear_cross_entropy(*a), autograd=(_setup, _backward),
    api="fused_linear_cross_entropy")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _default_chunk(n: int, vocab: int) -> int:
    # About 2M logits per chunk (8 MiB in fp32): large GEMMs, small next to [N, V] at LLM sizes.
    return max(1, min(max(n, 1), max(64, (1 << 21) // max(1, vocab))))


def _validate(op, h, weight, target, bias, ignore_index, chunk_size) -> None:
    for name, t in (("h", h), ("weight", weight)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {got}")
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32):
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"{op}: target must be class indices (int64), got {got}")
    if h.dim() < 1 or weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"{op}: h must be [..., D] and weight [V, D] with D = h.size(-1), got h {tuple(h.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if weight.dtype != h.dtype:
        raise TypeError(f"{op}: h and weight must share a dtype (as F.linear), got {h.dtype} and {weight.dtype}")
    if tuple(target.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"{op}: target must have h's leading shape {tuple(h.shape[:-1])} (one class per row), "
                         f"got {tuple(target.shape)}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)
                             or bias.dtype != h.dtype):
        got = (tuple(bias.shape), bias.dtype) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{op}: bias must be [V] = [{weight.shape[0]}] in {h.dtype}, got {got}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != h.device:
            raise ValueError(f"{op}: {name} must be on h's device {h.device}, got {t.device}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")


def fused_linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                               ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                               chunk_size: Optional[int] = None, backend: Optional[str] = None,
                               validate: bool = True) -> Tensor:
    """cross_entropy(h @ weight.T + bias, target), fused: the LM head and its SFT loss.

    Args:
        h: [..., D] final hidden states (N rows = prod of the leading dims).
        weight: [V, D] the LM head (h's dtype); bias: [V] or None.
        target: [...] int64 class per row (h's leading shape), `ignore_index` for rows without a
            label. For a causal LM, shift the labels first (target[t] = labels[t + 1]).
        reduction: "mean" over the labelled rows (NaN when there is none, as F.cross_entropy) or
            "sum". Per-row losses ("none") are not fused: use the eager composition.
        chunk_size: labelled rows projected at a time (default: about 2M logits per chunk).

    Returns a 0-dim float32 loss (float64 for float64 inputs; bf16/fp16 logits are read in fp32).
    Only labelled rows are projected; the gradients of h (zero on unlabelled rows), weight and
    bias are computed in forward and scaled by grad_output in backward. No gradient buffer is
    allocated under no_grad or for tensors that do not require grad.
    """
    op = "fused_linear_cross_entropy"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {sorted(REDUCTIONS)} (per-row losses: "
                         f"fused_linear_cross_entropy_eager with reduction='none'), got {reduction!r}")
    if validate:
        _validate(op, h, weight, target, bias, ignore_index, chunk_size)
    be = LINEAR_CROSS_ENTROPY.select(h.device, backend)
    if be == "eager":
        return fused_linear_cross_entropy_eager(h, weight, target, bias, ignore_index=ignore_index,
                                                reduction=reduction)
    N = math.prod(h.shape[:-1])
    h2 = h.reshape(N, h.shape[-1])
    t1 = target.reshape(N).to(torch.int64)
    chunk = int(chunk_size) if chunk_size is not None else _default_chunk(N, weight.shape[0])
    grad_on = torch.is_grad_enabled()
    need = (grad_on and h.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    loss, _, _, _ = LINEAR_CROSS_ENTROPY(be, h2, weight, bias, t1, int(ignore_index), REDUCTIONS[reduction],
                                                    chunk, *need)
    return loss


class FusedLinearCrossEntropyLoss(nn.Module):
    """forward(h, weight, target, bias=None): fused_linear_cross_entropy as a loss module (it holds
    no parameters: pass the LM head's weight, as Liger's fused linear cross-entropy does)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, reduction: str = "mean", chunk_size: Optional[int] = None,
                 backend: Optional[str] = None):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"FusedLinearCrossEntropyLoss: reduction must be one of {sorted(REDUCTIONS)}, "
                             f"got {reduction!r}")
        self.ignore_index, self.reduction, self.chunk_size, self.backend = ignore_index, reduction, chunk_size, backend

    def forward(self, h: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return fused_linear_cross_entropy(h, weight, target, bias, ignore_index=self.ignore_index,
                                          reduction=self.reduction, chunk_size=self.chunk_size, backend=self.backend)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"


# =============================================================================================
# RMSNorm and SwiGLU of the LLM (Qwen2RMSNorm, Qwen2MLP's silu(gate) * up)
# =============================================================================================


def rms_norm_eager(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Qwen2RMSNorm.forward, verbatim: float32 statistics (float64 stays float64), the normalised
    value rounded to x's dtype, then times the weight."""
    input_dtype = x.dtype
    h = x.to(acc_dtype(x.dtype))
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def swiglu_eager(gate: Tensor, up: Tensor) -> Tensor:
    """Qwen2MLP's act_fn(gate_proj(x)) * up_proj(x) with act_fn = silu."""
    return F.silu(gate) * up


def _fake_rms_norm(x, weight, eps):
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty((x.shape[0],), dtype=acc_dtype(x.dtype))


def _fake_rms_norm_backward(grad_y, x, weight, rstd, need_x, need_w):
    gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    gw = x.new_empty(weight.shape, dtype=acc_dtype(x.dtype)) if need_w else x.new_empty((0,), dtype=acc_dtype(x.dtype))
    return gx, gw


def _fake_swiglu(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _fake_swiglu_backward(grad, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format))


def _setup_rms(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.w_dtype = weight.dtype
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, rstd)


def _rms_backward(ctx, gy, _grstd):
    if gy is None:
        return None, None, None
    refuse_double_backward("rms_norm", gy)
    x, weight, rstd = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gw = ctx.ops.rms_norm_backward(gy, x, weight, rstd, need_x, need_w)
    return (gx if need_x else None), (gw.to(ctx.w_dtype) if need_w else None), None


def _setup_swiglu(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, grad):
    refuse_double_backward("swiglu", grad)
    gate, up = ctx.saved_tensors
    dg, du = ctx.ops.swiglu_backward(grad, gate, up)
    return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None)


RMS_NORM = LM.op("rms_norm", "(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)", fake=_fake_rms_norm,
                 triton=lambda K, *a: K.rms_norm(*a), autograd=(_setup_rms, _rms_backward))
LM.op("rms_norm_backward", "(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, bool need_x, bool need_w) "
      "-> (Tensor, Tensor)", fake=_fake_rms_norm_backward, triton=lambda K, *a: K.rms_norm_backward(*a))
SWIGLU = LM.op("swiglu", "(Tensor gate, Tensor up) -> Tensor", fake=_fake_swiglu, triton=lambda K, *a: K.swiglu(*a),
               autograd=(_setup_swiglu, _swiglu_backward))
LM.op("swiglu_backward", "(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)", fake=_fake_swiglu_backward,
      triton=lambda K, *a: K.swiglu_backward(*a))


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: Optional[str] = None,
             validate: bool = True) -> Tensor:
    """Qwen2's RMSNorm: weight * (x * rsqrt(mean(x^2, -1) + eps)), statistics in float32.

    x: [..., D]; weight: [D]. The result has torch.promote_types(x.dtype, weight.dtype), like
    Qwen2RMSNorm (the normalised value is rounded to x's dtype before the weight multiplies it).
    The compiled backends do forward and backward in one pass over each row each (the eager
    composition makes six passes forward and more backward)."""
    op = "rms_norm"
    if validate:
        if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or not x.is_floating_point() \
                or not weight.is_floating_point():
            raise TypeError(f"{op}: x and weight must be floating-point tensors")
        if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(f"{op}: weight must be [D] with D = x.size(-1), got x {tuple(x.shape)} and weight "
                             f"{tuple(weight.shape)}")
        if weight.device != x.device:
            raise ValueError(f"{op}: weight must be on x's device {x.device}, got {weight.device}")
        if not eps >= 0:
            raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    be = RMS_NORM.select(x.device, backend)
    if be == "eager":
        return rms_norm_eager(x, weight, eps)
    y, _ = RMS_NORM(be, x.reshape(-1, x.shape[-1]), weight, float(eps))
    return y.view(x.shape)


def swiglu(gate: Tensor, up: Tensor, *, backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """silu(gate) * up (the SwiGLU of Qwen2/Llama MLPs), one pass forward and one backward."""
    op = "swiglu"
    if validate:
        if not isinstance(gate, Tensor) or not isinstance(up, Tensor) or not gate.is_floating_point():
            raise TypeError(f"{op}: gate and up must be floating-point tensors")
        if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
            raise ValueError(f"{op}: gate and up must have one shape, dtype and device, got {tuple(gate.shape)} "
                             f"{gate.dtype} {gate.device} and {tuple(up.shape)} {up.dtype} {up.device}")
    be = SWIGLU.select(gate.device, backend)
    if be == "eager":
        return swiglu_eager(gate, up)
    return SWIGLU(be, gate, up)


class RMSNorm(nn.Module):
    """RMSNorm(hidden_size, eps): the rms_norm op as a module, with Qwen2RMSNorm's parameter
    (`weight`) and attribute (`variance_epsilon`) names, so state dicts load either way."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon, backend=getattr(self, "backend", None))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


# =============================================================================================
# RoPE (transformers' apply_rotary_pos_emb)
# =============================================================================================


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_eager(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb, verbatim."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def _fake_rope(q, k, cos, sin):
    def like(x):
        return torch.empty_like(x if x.stride(-1) == 1 else x.contiguous())
    return like(q), like(k)


def _setup_rope(ctx, inputs, output):
    _, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, gq, gk):  # grads are materialised (zeros for an unused output)
    refuse_double_backward("rope", gq)
    cos, sin = ctx.saved_tensors
    dq, dk = ctx.ops.rope_backward(gq, gk, cos, sin)
    return dq, dk, None, None


ROPE = LM.op("rope", "(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)", fake=_fake_rope,
             triton=lambda K, *a: K.rope(*a), autograd=(_setup_rope, _rope_backward))
LM.op("rope_backward", "(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin) -> (Tensor, Tensor)", fake=_fake_rope,
      triton=lambda K, *a: K.rope(*a, backward=True))


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1, *, backend: Optional[str] = None,
         validate: bool = True) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of the queries and keys, as transformers' apply_rotary_pos_emb:
    (q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin).

    q: [B, H, L, D] and k: [B, Hk, L, D] (unsqueeze_dim=1; [B, L, H, D] with unsqueeze_dim=2), any
    strides (the attention's transposed views are read in place); cos, sin: [B or 1, L, D]. The
    compiled backends rotate q and k in one op, forward and backward one pass each. cos / sin that
    require grad take the eager composition (the kernels give no gradient to them)."""
    op = "rope"
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"{op}: unsqueeze_dim must be 1 ([B, H, L, D]) or 2 ([B, L, H, D]), got {unsqueeze_dim}")
    if validate:
        for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"{op}: {name} must be a floating-point tensor")
        qq, kk = (q, k) if unsqueeze_dim == 1 else (q.transpose(1, 2), k.transpose(1, 2))
        ok = (qq.dim() == 4 and kk.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape
              and qq.shape[0] == kk.shape[0] and qq.shape[2:] == kk.shape[2:] and cos.shape[0] in (1, qq.shape[0])
              and tuple(cos.shape[1:]) == tuple(qq.shape[2:]) and qq.shape[3] % 2 == 0)
        if not ok:
            raise ValueError(f"{op}: need q [B, H, L, D] and k [B, Hk, L, D] with D even (unsqueeze_dim=1), cos and sin "
                             f"[B or 1, L, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, "
                             f"sin {tuple(sin.shape)}")
        if q.dtype != k.dtype:
            raise TypeError(f"{op}: q and k must share a dtype, got {q.dtype} and {k.dtype}")
        if not (q.device == k.device == cos.device == sin.device):
            raise ValueError(f"{op}: q, k, cos and sin must be on one device")
    be = ROPE.select(q.device, backend)
    if be == "eager" or (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)):
        return rope_eager(q, k, cos, sin, unsqueeze_dim)
    if unsqueeze_dim == 2:
        qo, ko = ROPE(be, q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return qo.transpose(1, 2), ko.transpose(1, 2)
    return ROPE(be, q, k, cos, sin)
