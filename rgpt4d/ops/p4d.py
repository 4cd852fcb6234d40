"""P4D (Perceptual 4D Distillation) loss ops: public API, eager references, autograd, registration.

The paper's training loss adds to L_SFT

    total = alpha * L_LD + beta * sum_m lambda_m * L_m

L_LD compares the decoded latent F^_4D with the frozen teacher's latent F_4D; L_m compares the
explicit predictions P^_m (teacher heads on F^_4D) with the teacher's P_m, for m in depth, flow,
motion, camray. Two presets (../shared/PAPER.md, "Perceptual 4D Distillation"):

- "paper": SmoothL1 everywhere; alpha 0.5, beta 0.1; lambda depth 1.0, flow 0.1, motion 0.05,
  camray 0.05.
- "code" (the released code): per-token MSE; depth compared as log(x + 1e-8); weights latent
  0.01, depth 0.1, flow 0.001, motion 0.01 (beta 1).

Ops (backends: eager here; cpu/cuda in csrc/p4d/; triton in kernels/p4d.py):

- `p4d_loss`: every term in one pass. Each pred/target element is read once; the gradient of the
  total with respect to each prediction is written in that same pass (forward), and the backward
  only scales it by the real grad_output (a scalar 0.5, or whatever flows from a larger graph).
- `fused_linear_latent_loss`: the last Linear of the training-only decoder D_4DP fused with the
  latent loss, chunked over tokens, so the projected [N, D_teacher] activation and its gradient
  never exist whole.

Gradients computed in forward: the op returns, next to the losses, one buffer per prediction
holding f_i * dL_i/dpred_i (pred's dtype; f_i the term's weight in the total, or 1 when that is
0). They are saved for backward (and released after it) and never modified: the backward returns
buf * (g_total * w_i + g_term_i) / f_i, or the buffer itself when that factor is exactly 1 on the
CPU (the usual `loss.backward()`: no pass over it, no copy). So retain_graph and repeated
backwards are correct; double backward (create_graph=True) raises, since the kernels produce
first-order gradients only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgpt4d.ops.registry import (Family, acc_dtype, grads_from_forward, is_real_tensor, refuse_double_backward,
                                  scaled)

KINDS = {"smooth_l1": 0, "mse": 1, "l1": 2}
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
LOG_EPS = 1e-8  # depth in the "code" preset is compared as log(x + 1e-8)

# Per-term flags of the compiled/Triton op (csrc/p4d/p4d_math.h).
_FLAG_LOG, _FLAG_GRAD, _FLAG_MASK = 1, 2, 4


@dataclass(frozen=True)
class P4DPreset:
    """One configuration of the P4D loss: the loss of each term, its weight, and its space.

    A term is "latent" or an explicit head's name. Every term uses `kind` (and the SmoothL1
    threshold `beta`) unless `kinds` / `betas` name it; the terms in `log_space` are compared as
    log(x + 1e-8). Derive a variant with `PRESETS["paper"].replace(kinds={"flow": "l1"})`.
    """

    kind: str                 # "smooth_l1" | "mse" | "l1"
    latent_weight: float      # alpha
    explicit_weight: float    # beta of the paper, multiplies every head weight
    head_weights: Mapping[str, float] = field(default_factory=dict)  # lambda_m
    log_space: tuple = ()     # terms compared as log(x + 1e-8)
    beta: float = 1.0         # the SmoothL1 threshold (1.0, as torch)
    kinds: Mapping[str, str] = field(default_factory=dict)     # per-term kind
    betas: Mapping[str, float] = field(default_factory=dict)   # per-term SmoothL1 threshold

    def replace(self, **changes) -> "P4DPreset":
        return dataclasses.replace(self, **changes)


PRESETS = {
    "paper": P4DPreset("smooth_l1", 0.5, 0.1, {"depth": 1.0, "flow": 0.1, "motion": 0.05, "camray": 0.05}),
    "code": P4DPreset("mse", 0.01, 1.0, {"depth": 0.1, "flow": 0.001, "motion": 0.01}, log_space=("depth",)),
}


class P4DLossOutput(NamedTuple):
    """total: the weighted sum (0-dim); terms: each term's unweighted loss (0-dim), for logging."""

    total: Tensor
    terms: dict


@dataclass
class _Term:
    name: str
    pred: Tensor
    target: Tensor
    mask: Optional[Tensor]
    kind: int
    beta: float
    log: bool
    weight: float  # effective weight in the total (alpha, or beta * lambda_m)


# ---------------------------------------------------------------------------------------------
# Eager references (readable; the tests compare every backend with a float64 composition)
# ---------------------------------------------------------------------------------------------


def _elementwise_loss(p: Tensor, t: Tensor, kind: int, beta: float, reduction: str) -> Tensor:
    if kind == 0 and beta > 0:
        return F.smooth_l1_loss(p, t, reduction=reduction, beta=beta)
    if kind == 1:
        return F.mse_loss(p, t, reduction=reduction)
    return F.l1_loss(p, t, reduction=reduction)  # l1, and smooth_l1 with beta 0 (as torch)


def p4d_term_eager(pred: Tensor, target: Tensor, mask: Optional[Tensor] = None, *, kind: str = "smooth_l1",
                   beta: float = 1.0, log_space: bool = False, reduction: str = "mean",
                   log_eps: float = LOG_EPS) -> Tensor:
    """One P4D term in plain PyTorch, computed in float32 (float64 for float64 inputs).

    The mean runs over the valid elements of `mask` (broadcastable to pred); none valid gives 0
    and a zero gradient. Masked-out elements never reach the loss (NaN targets there are fine).
    The target is detached: it never receives gradient.
    """
    k = KINDS[kind] if isinstance(kind, str) else kind
    acc = acc_dtype(pred.dtype, target.dtype)
    p, t = pred.to(acc), target.detach().to(acc)
    if mask is not None:
        m = _broadcast_mask(mask, pred.shape)
        one = torch.ones((), dtype=acc, device=p.device)
        p, t = torch.where(m, p, one), torch.where(m, t, one)  # equal fills: loss 0, gradient 0
        count = m.sum()
    else:
        count = torch.tensor(pred.numel(), device=p.device)
    if log_space:
        p, t = torch.log(p + log_eps), torch.log(t + log_eps)
    total = _elementwise_loss(p, t, k, beta, "sum")
    if reduction == "sum":
        return total
    return torch.where(count > 0, total / count.clamp(min=1).to(acc), torch.zeros((), dtype=acc, device=p.device))


def _p4d_loss_eager(terms: list, reduction: str, log_eps: float) -> tuple[Tensor, list]:
    losses = [p4d_term_eager(t.pred, t.target, t.mask, kind=t.kind, beta=t.beta, log_space=t.log,
                             reduction=reduction, log_eps=log_eps) for t in terms]
    acc = acc_dtype(*(x.dtype for x in losses))
    total = sum(t.weight * loss.to(acc) for t, loss in zip(terms, losses))
    return total, [loss.to(acc) for loss in losses]


def fused_linear_latent_loss_eager(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, *,
                                   kind: str = "smooth_l1", beta: float = 1.0, mask: Optional[Tensor] = None,
                                   reduction: str = "mean") -> Tensor:
    """Linear then loss, unfused: y = h @ weight.T + bias; the loss of y against target.

    none: per-token loss (mean over D_out; 0 for masked tokens), shape h.shape[:-1].
    mean: over all valid tokens' elements. sum: over them.
    """
    k = KINDS[kind] if isinstance(kind, str) else kind
    y = F.linear(h, weight, bias)
    acc = acc_dtype(y.dtype, target.dtype)
    y, t = y.to(acc), target.detach().to(acc)
    if mask is not None:
        m = torch.broadcast_to(mask, h.shape[:-1])
        t = torch.where(m.unsqueeze(-1), t, y.detach())  # masked tokens: loss 0, gradient 0, whatever t holds
        n_valid = m.sum()
    else:
        n_valid = torch.tensor(math.prod(h.shape[:-1]), device=y.device)
    per_elem = _elementwise_loss(y, t, k, beta, "none")
    if reduction == "none":
        return per_elem.mean(-1) if per_elem.shape[-1] > 0 else per_elem.sum(-1)
    total = per_elem.sum()
    if reduction == "sum":
        return total
    return total / (n_valid * weight.shape[0]).clamp(min=1).to(acc)


# ---------------------------------------------------------------------------------------------
# Term resolution and validation
# ---------------------------------------------------------------------------------------------


def _broadcast_mask(mask: Tensor, shape) -> Tensor:
    return torch.broadcast_to(mask, shape)


def _canonical_mask(mask: Tensor, shape) -> tuple[Tensor, int]:
    """(flat bool mask, inner) with element e of a tensor of `shape` valid iff
    flat[(e // inner) % flat.numel()]. A mask that varies only over a run of consecutive
    dimensions of the prediction (a token mask [B, N, 1] of a latent [B, N, D], a [B, T, 1, H, W]
    mask of a one-channel depth map, a per-pixel [H, W] mask) is used as is; anything else is
    expanded to the prediction's shape (one byte per element)."""
    shape = tuple(shape)
    mshape = (1,) * (len(shape) - mask.dim()) + tuple(mask.shape)
    varying = [i for i, (m, s) in enumerate(zip(mshape, shape)) if m != 1]
    if not varying:
        return mask.reshape(1).contiguous(), 1
    lo, hi = varying[0], varying[-1]
    if all(mshape[i] == shape[i] for i in range(lo, hi + 1)):
        return mask.reshape(-1).contiguous(), math.prod(shape[hi + 1:])
    return torch.broadcast_to(mask.reshape(mshape), shape).reshape(-1).contiguous(), 1


def _resolve_terms(op: str, latent_pred, latent_target, explicit_preds, explicit_targets, preset, weights,
                   masks) -> list:
    explicit_preds, explicit_targets = dict(explicit_preds or {}), dict(explicit_targets or {})
    if explicit_preds.keys() != explicit_targets.keys():
        missing = sorted(set(explicit_preds) ^ set(explicit_targets))
        raise ValueError(f"{op}: explicit_preds and explicit_targets must have the same heads; "
                         f"unmatched: {missing}")
    if (latent_pred is None) != (latent_target is None):
        raise ValueError(f"{op}: pass both latent_pred and latent_target, or neither")
    if "latent" in explicit_preds:
        raise ValueError(f"{op}: 'latent' is the latent term's name; rename that explicit head")
    names = (["latent"] if latent_pred is not None else []) + list(explicit_preds)
    if not names:
        raise ValueError(f"{op}: no terms: pass latent_pred/latent_target and/or explicit heads")
    masks = dict(masks or {})
    for key in masks:
        if key not in names:
            raise ValueError(f"{op}: masks[{key!r}] given but there is no {key!r} term; terms here are {names}")
    terms = []
    for name, k, b, lg, w in _term_config(op, names, _preset(op, preset), dict(weights or {})):
        pred, target = (latent_pred, latent_target) if name == "latent" else (explicit_preds[name],
                                                                            explicit_targets[name])
        terms.append(_Term(name, pred, target, masks.get(name), k, b, lg, w))
    return terms


def _preset(op: str, preset) -> P4DPreset:
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"{op}: preset must be one of {sorted(PRESETS)} or a P4DPreset, got {preset!r}")
        return PRESETS[preset]
    if not isinstance(preset, P4DPreset):
        raise TypeError(f"{op}: preset must be a name ({sorted(PRESETS)}) or a P4DPreset, got {type(preset).__name__}")
    return preset


def _term_config(op: str, names: list, preset: P4DPreset, weights: dict) -> list:
    """(name, kind id, beta, log space, weight in the total) per term, with the options checked.
    Option keys may name the terms of this call, "latent", and the preset's heads (one preset and
    one weights dict serve batches with and without a head); weights may also name "explicit"."""
    known = set(names) | {"latent"} | set(preset.head_weights)
    for what, keys in (("weights", set(weights) - {"explicit"}), ("kinds", preset.kinds), ("betas", preset.betas),
                       ("log_space", preset.log_space)):
        for key in keys:
            if key not in known:
                raise ValueError(f"{op}: {what}[{key!r}]: unknown term; terms here are {names} (the preset's heads: "
                                 f"{sorted(preset.head_weights)})")
    explicit_w = float(weights.get("explicit", preset.explicit_weight))
    config = []
    for name in names:
        if name == "latent":
            w = float(weights.get("latent", preset.latent_weight))
        elif name in weights or name in preset.head_weights:
            w = explicit_w * float(weights.get(name, preset.head_weights.get(name, 0.0)))
        else:
            raise ValueError(f"{op}: no weight for head {name!r} (preset weights: {dict(preset.head_weights)}); "
                             f"pass weights={{{name!r}: ...}}")
        k = preset.kinds.get(name, preset.kind)
        if k not in KINDS:
            raise ValueError(f"{op}: term {name!r}: kind must be one of {sorted(KINDS)}, got {k!r}")
        b = float(preset.betas.get(name, preset.beta))
        if not b >= 0:
            raise ValueError(f"{op}: term {name!r}: beta must be >= 0, got {b}")
        config.append((name, KINDS[k], b, name in preset.log_space, w))
    return config


def _validate_terms(op: str, terms: list) -> None:
    device = None
    for t in terms:
        for what, x in (("prediction", t.pred), ("target", t.target)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{op}: term {t.name!r}: the {what} must be a Tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"{op}: term {t.name!r}: the {what} must be a floating-point tensor, got {x.dtype}")
        if t.pred.shape != t.target.shape:
            raise ValueError(f"{op}: term {t.name!r}: prediction shape {tuple(t.pred.shape)} and target shape "
                             f"{tuple(t.target.shape)} differ")
        device = device or t.pred.device
        if t.pred.device != device or t.target.device != device:
            raise ValueError(f"{op}: term {t.name!r}: all tensors must be on one device ({device}), got prediction "
                             f"on {t.pred.device} and target on {t.target.device}")
        if t.mask is not None:
            _validate_mask(op, f"masks[{t.name!r}]", t.mask, t.pred.shape, f"the {t.name} prediction", device)


def _validate_mask(op: str, what: str, mask, shape, of: str, device) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{op}: {what} must be a bool tensor, got {got}")
    if mask.device != device:
        raise ValueError(f"{op}: {what} must be on {device}, got {mask.device}")
    # torch.broadcast_to(mask, shape) semantics: no more dims than the prediction, each 1 or equal.
    ok = mask.dim() <= len(shape) and all(m == 1 or m == s for m, s in zip(reversed(mask.shape), reversed(tuple(shape))))
    if not ok:
        raise ValueError(f"{op}: {what} of shape {tuple(mask.shape)} is not broadcastable to {of} of shape "
                         f"{tuple(shape)}")


# ---------------------------------------------------------------------------------------------
# Declaration: schemas, fake functions, autograd (csrc/p4d/ and kernels/p4d.py implement them)
# ---------------------------------------------------------------------------------------------


def _fake_p4d_loss(preds, targets, masks, mask_inner, kinds, betas, flags, weights, mean, log_eps):
    acc = acc_dtype(*(p.dtype for p in preds), *(t.dtype for t in targets))
    grads = [torch.empty_like(p, memory_format=torch.contiguous_format) if flags[i] & _FLAG_GRAD
             else p.new_empty((0,)) for i, p in enumerate(preds)]
    return preds[0].new_empty((), dtype=acc), preds[0].new_empty((len(preds),), dtype=acc), grads


def _fake_linear_loss(h, weight, bias, target, mask, kind, beta, reduction, chunk_size, need_h_grad, need_w_grad,
                      need_b_grad):
    acc = acc_dtype(h.dtype)
    now = reduction != 0
    loss = h.new_empty((h.shape[0],) if reduction == 0 else (), dtype=acc)
    gh = h.new_empty(h.shape) if (need_h_grad and now) else h.new_empty((0,))
    gw = h.new_empty(weight.shape, dtype=acc) if (need_w_grad and now) else h.new_empty((0,), dtype=acc)
    gb = (h.new_empty((weight.shape[0],), dtype=acc) if (need_b_grad and now and bias is not None)
          else h.new_empty((0,), dtype=acc))
    return loss, gh, gw, gb


def _fake_linear_loss_backward(grad_loss, h, weight, bias, target, mask, kind, beta, chunk_size, need_h_grad,
                               need_w_grad, need_b_grad):
    acc = acc_dtype(h.dtype)
    gh = h.new_empty(h.shape) if need_h_grad else h.new_empty((0,))
    gw = h.new_empty(weight.shape, dtype=acc) if need_w_grad else h.new_empty((0,), dtype=acc)
    gb = (h.new_empty((weight.shape[0],), dtype=acc) if (need_b_grad and bias is not None)
          else h.new_empty((0,), dtype=acc))
    return gh, gw, gb


def _setup_p4d_loss(ctx, inputs, output):
    preds, targets, masks, mask_inner, kinds, betas, flags, weights, mean, log_eps = inputs
    _, _, grads = output
    ctx.flags, ctx.weights = list(flags), list(weights)
    ctx.n = len(preds)
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)  # no zero-filled grad_outputs for the gradient buffers
    ctx.save_for_backward(*grads)  # released after backward (unless retain_graph)


def _host_scalars(g: Optional[Tensor]):
    """g as Python numbers when it is a real CPU tensor outside any graph (read once: no tensor
    op per term), else g itself."""
    if g is not None and is_real_tensor(g) and g.device.type == "cpu" and not g.requires_grad:
        return g.tolist()
    return g


def _buffer_grads(flags, weights, need, bufs, g_total, g_losses) -> list:
    """The gradient of each prediction from the buffers computed in forward: bufs[i] holds
    f * dL_i/dpred (f the weight w, or 1 when w is 0); d(total)/dpred = w * dL_i/dpred and
    d(losses[i])/dpred = dL_i/dpred. A factor of exactly 1 returns the buffer itself."""
    refuse_double_backward("p4d_loss", g_total if g_total is not None else g_losses)
    g_total, g_losses = _host_scalars(g_total), _host_scalars(g_losses)
    grads = []
    for i, buf in enumerate(bufs):
        if not need[i]:
            grads.append(None)
            continue
        if not flags[i] & _FLAG_GRAD:
            raise RuntimeError(f"p4d_loss: the gradient of term {i} was not computed in forward (its flags lack "
                               f"the gradient bit {_FLAG_GRAD}); call the op with it set when the prediction "
                               "requires grad")
        w = weights[i]
        f = w if w != 0 else 1.0
        s = None if g_total is None else g_total * (w / f)
        if g_losses is not None:
            s = g_losses[i] * (1.0 / f) if s is None else s + g_losses[i] * (1.0 / f)
        if s is None:  # neither the total nor this term's loss is used: no gradient
            grads.append(None)
        elif isinstance(s, float):
            grads.append(buf if s == 1.0 else buf * s)
        else:
            grads.append(scaled(buf, s))
    return grads


def _p4d_loss_backward(ctx, g_total, g_losses, _g_grads):
    need = ctx.needs_input_grad[0]
    need = need if isinstance(need, (list, tuple)) else [need] * ctx.n
    grads = _buffer_grads(ctx.flags, ctx.weights, need, ctx.saved_tensors, g_total, g_losses)
    none = [None] * ctx.n
    return grads, none, none, None, None, None, None, None, None, None


def _setup_linear_loss(ctx, inputs, output):
    h, weight, bias, target, mask, kind, beta, reduction, chunk_size, nh, nw, nb = inputs
    _, gh, gw, gb = output
    ctx.reduction = reduction
    ctx.cfg = (kind, beta, chunk_size)
    ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.has_bias = bias is not None
    ctx.numels = (h.numel(), weight.numel(), 0 if bias is None else bias.numel())
    ctx.mark_non_differentiable(gh, gw, gb)
    ctx.set_materialize_grads(False)
    if reduction == 0:
        # Per-token losses: the gradient depends on the per-token grad_output; the backward
        # recomputes the projection chunk by chunk from the inputs.
        ctx.save_for_backward(h, weight, bias, target, mask)
    else:
        ctx.save_for_backward(gh, gw, gb)


def _linear_loss_backward(ctx, g_loss, _gh, _gw, _gb):
    if g_loss is None:
        return (None,) * 12
    refuse_double_backward("fused_linear_latent_loss", g_loss)
    if ctx.reduction == 0:
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        h, weight, bias, target, mask = ctx.saved_tensors
        kind, beta, chunk = ctx.cfg
        gh, gw, gb = ctx.ops.p4d_linear_loss_backward(g_loss.contiguous(), h, weight, bias, target, mask, kind, beta,
                                                      chunk, bool(need_h), bool(need_w), bool(need_b and ctx.has_bias))
        grads = (gh if need_h else None, gw.to(ctx.dtypes[1]) if need_w else None,
                 gb.to(ctx.dtypes[2]) if (need_b and ctx.has_bias) else None)
    else:
        grads = grads_from_forward("fused_linear_latent_loss", ctx, g_loss, *ctx.saved_tensors)
    return (*grads, None, None, None, None, None, None, None, None, None)


P4D = Family("p4d")
P4D_LOSS = P4D.op(
    "p4d_loss", "(Tensor[] preds, Tensor[] targets, Tensor[] masks, int[] mask_inner, int[] kinds, float[] betas, "
    "int[] flags, float[] weights, bool mean, float log_eps) -> (Tensor, Tensor, Tensor[])",
    fake=_fake_p4d_loss, triton=lambda K, *a: K.p4d_loss(*a), autograd=(_setup_p4d_loss, _p4d_loss_backward))
P4D_LINEAR_LOSS = P4D.op(
    "p4d_linear_loss", "(Tensor h, Tensor weight, Tensor? bias, Tensor target, Tensor? mask, int kind, float beta, "
    "int reduction, int chunk_size, bool need_h_grad, bool need_w_grad, bool need_b_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor)", fake=_fake_linear_loss, triton=lambda K, *a: K.linear_loss_fwd(*a),
    autograd=(_setup_linear_loss, _linear_loss_backward), api="fused_linear_latent_loss")
P4D.op("p4d_linear_loss_backward",
       "(Tensor grad_loss, Tensor h, Tensor weight, Tensor? bias, Tensor target, Tensor? mask, int kind, float beta, "
       "int chunk_size, bool need_h_grad, bool need_w_grad, bool need_b_grad) -> (Tensor, Tensor, Tensor)",
       fake=_fake_linear_loss_backward, triton=lambda K, *a: K.linear_loss_bwd(*a))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def p4d_loss(latent_pred: Optional[Tensor], latent_target: Optional[Tensor],
             explicit_preds: Optional[Mapping[str, Tensor]] = None,
             explicit_targets: Optional[Mapping[str, Tensor]] = None, *,
             preset: Union[str, P4DPreset] = "paper", weights: Optional[Mapping[str, float]] = None,
             masks: Optional[Mapping[str, Tensor]] = None, reduction: str = "mean", backend: Optional[str] = None,
             validate: bool = True) -> P4DLossOutput:
    """The P4D distillation loss: total = alpha * L_LD + beta * sum_m lambda_m * L_m.

    Args:
        latent_pred, latent_target: the decoded latent F^_4D and the teacher's F_4D (any shape,
            e.g. [B, N', h', w', C] or [B, tokens, C]); None for an explicit-only loss.
        explicit_preds, explicit_targets: dicts keyed by head name ("depth", "flow", "motion",
            "camray", or any name) of matching-shape tensors.
        preset: "paper" or "code" (module docstring), or a P4DPreset (each term's loss kind,
            SmoothL1 threshold and log space; e.g. PRESETS["paper"].replace(kinds={"flow": "l1"})).
        weights: overrides by term: "latent" (alpha), "explicit" (beta), or a head (lambda_m).
        masks: dict by term name of bool tensors broadcastable to that term's prediction; the
            mean runs over valid elements, and a term with none is 0 with zero gradient (no NaN).
        reduction: "mean" (per term, over its valid elements) or "sum".
        backend: "eager" | "cpu" | "triton" | "cuda" | None (automatic).
        validate: check names, shapes, dtypes, devices (cheap; no data is read).

    Returns P4DLossOutput(total, terms): terms maps each term name to its unweighted loss. Both
    are float32 (float64 when an input is float64); bf16/fp16 inputs accumulate in float32.
    Targets never receive gradient. The kernels compute each prediction's gradient in the
    forward pass, once; backward scales it by grad_output. Under torch.no_grad(), or for
    predictions that do not require grad, no gradient buffer is allocated.
    """
    op = "p4d_loss"
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum' (per-element losses: F.smooth_l1_loss / "
                         f"F.mse_loss with reduction='none'), got {reduction!r}")
    terms = _resolve_terms(op, latent_pred, latent_target, explicit_preds, explicit_targets, preset, weights, masks)
    if validate:
        _validate_terms(op, terms)
    device = terms[0].pred.device
    be = P4D_LOSS.select(device, backend)
    names = [t.name for t in terms]
    if be == "eager":
        total, losses = _p4d_loss_eager(terms, reduction, LOG_EPS)
        return P4DLossOutput(total, dict(zip(names, losses)))
    grad_on = torch.is_grad_enabled()
    masks_c, inner, flags = [], [], []
    for t in terms:
        fl = (_FLAG_LOG if t.log else 0) | (_FLAG_GRAD if (grad_on and t.pred.requires_grad) else 0)
        if t.mask is not None:
            m, k = _canonical_mask(t.mask, t.pred.shape)
            fl |= _FLAG_MASK
        else:
            m, k = t.pred.new_empty((0,), dtype=torch.bool), 1  # never read
        masks_c.append(m)
        inner.append(k)
        flags.append(fl)
    total, losses, _ = P4D_LOSS(be, [t.pred for t in terms], [t.target.detach() for t in terms], masks_c, inner,
                                           [t.kind for t in terms], [t.beta for t in terms], flags,
                                           [t.weight for t in terms], reduction == "mean", LOG_EPS)
    return P4DLossOutput(total, dict(zip(names, losses.unbind(0))))


def _default_chunk(n: int, d_in: int, d_out: int) -> int:
    # About 2M projected elements per chunk (8 MiB in fp32): large enough for efficient GEMMs,
    # small next to the whole [N, D_out] projection at the paper's sizes.
    rows = max(64, ((1 << 21) // max(1, d_out)) // 64 * 64)
    return max(1, min(n, rows))


def fused_linear_latent_loss(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, *,
                             kind: str = "smooth_l1", beta: float = 1.0, mask: Optional[Tensor] = None,
                             reduction: str = "mean", chunk_size: Optional[int] = None,
                             backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """loss(h @ weight.T + bias, target), fused and chunked over tokens.

    The last Linear of the training-only decoder D_4DP with the latent loss: the projected
    [N, D_out] activation and its gradient exist one chunk of `chunk_size` tokens at a time.

    Args:
        h: [..., D_in] decoder hidden states (N tokens = prod of the leading dims).
        weight: [D_out, D_in]; bias: [D_out] or None (h's dtype).
        target: [..., D_out] teacher latent, same leading dims as h; never receives gradient.
        kind: "smooth_l1" | "mse" | "l1"; beta: the SmoothL1 threshold.
        mask: bool token mask broadcastable to h.shape[:-1] (e.g. [B, N]).
        reduction: "mean" over all valid tokens' N x D_out elements (as F.smooth_l1_loss does),
            "sum", or "none": per-token losses (mean over D_out, 0 for masked tokens), shape
            h.shape[:-1].
        chunk_size: tokens per chunk (default: about 2M projected elements).

    mean / sum: the gradients of h, weight (accumulated in fp32) and bias are computed in forward
    and scaled by grad_output in backward; none: the backward recomputes the projection chunk by
    chunk with the per-token grad_output. No gradient buffer is allocated under no_grad, for a
    frozen weight/bias, or for an h that does not require grad.
    """
    op = "fused_linear_latent_loss"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    if kind not in KINDS:
        raise ValueError(f"{op}: kind must be one of {sorted(KINDS)}, got {kind!r}")
    if validate:
        _validate_linear(op, h, weight, bias, target, mask, beta, chunk_size)
    lead = tuple(h.shape[:-1])
    N = math.prod(lead)
    be = P4D_LINEAR_LOSS.select(h.device, backend)
    if be == "eager":
        return fused_linear_latent_loss_eager(h, weight, bias, target, kind=kind, beta=beta, mask=mask,
                                              reduction=reduction)
    h2 = h.reshape(N, h.shape[-1])
    t2 = target.detach().reshape(N, target.shape[-1])
    m1 = torch.broadcast_to(mask, lead).reshape(N) if mask is not None else None
    chunk = int(chunk_size) if chunk_size is not None else _default_chunk(N, h.shape[-1], weight.shape[0])
    grad_on = torch.is_grad_enabled()
    need = (grad_on and h.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    loss, _, _, _ = P4D_LINEAR_LOSS(be, h2, weight, bias, t2, m1, KINDS[kind], float(beta),
                                               REDUCTIONS[reduction], chunk, *need)
    return loss.reshape(lead) if reduction == "none" else loss


def _validate_linear(op, h, weight, bias, target, mask, beta, chunk_size) -> None:
    for name, t in (("h", h), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {got}")
    if h.dim() < 1 or weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"{op}: h must be [..., D_in] and weight [D_out, D_in] with D_in = h.size(-1) = "
                         f"{h.shape[-1] if h.dim() else '?'}, got h {tuple(h.shape)} and weight {tuple(weight.shape)}")
    if weight.dtype != h.dtype:
        raise TypeError(f"{op}: h and weight must share a dtype (as F.linear), got {h.dtype} and {weight.dtype}")
    if tuple(target.shape) != tuple(h.shape[:-1]) + (weight.shape[0],):
        raise ValueError(f"{op}: target must be [..., D_out] = {tuple(h.shape[:-1]) + (weight.shape[0],)} "
                         f"(h's leading dims, weight's D_out), got {tuple(target.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],) or bias.dtype != h.dtype:
            got = (tuple(bias.shape), bias.dtype) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"{op}: bias must be [D_out] = [{weight.shape[0]}] in {h.dtype}, got {got}")
    for name, t in (("weight", weight), ("bias", bias), ("target", target)):
        if t is not None and t.device != h.device:
            raise ValueError(f"{op}: {name} must be on h's device {h.device}, got {t.device}")
    if mask is not None:
        _validate_mask(op, "mask", mask, h.shape[:-1], "the tokens h.shape[:-1]", h.device)
    if not beta >= 0:
        raise ValueError(f"{op}: beta must be >= 0, got {beta}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class P4DLoss(nn.Module):
    """The P4D loss as a module: P4DLoss(preset="paper"|"code"|P4DPreset, **overrides).

    Overrides are p4d_loss's keyword arguments (weights, reduction, backend, validate).
    forward(latent_pred, latent_target, explicit_preds=None, explicit_targets=None, masks=None)
    -> P4DLossOutput(total, terms).
    """

    _OVERRIDES = ("weights", "reduction", "backend", "validate")

    def __init__(self, preset: Union[str, P4DPreset] = "paper", **overrides):
        super().__init__()
        bad = sorted(set(overrides) - set(self._OVERRIDES))
        if bad:
            raise TypeError(f"P4DLoss: unknown options {bad}; choose from {list(self._OVERRIDES)}")
        if isinstance(preset, str) and preset not in PRESETS:
            raise ValueError(f"P4DLoss: preset must be one of {sorted(PRESETS)}, got {preset!r}")
        self.preset = preset
        self.overrides = overrides

    def forward(self, latent_pred: Optional[Tensor], latent_target: Optional[Tensor],
                explicit_preds: Optional[Mapping[str, Tensor]] = None,
                explicit_targets: Optional[Mapping[str, Tensor]] = None,
                masks: Optional[Mapping[str, Tensor]] = None) -> P4DLossOutput:
        return p4d_loss(latent_pred, latent_target, explicit_preds, explicit_targets, preset=self.preset,
                        masks=masks, **self.overrides)

    def extra_repr(self) -> str:
        name = self.preset if isinstance(self.preset, str) else "custom"
        return f"preset={name!r}" + "".join(f", {k}={v!r}" for k, v in self.overrides.items())


class FusedLinearLatentLoss(nn.Module):
    """The last Linear of the decoder D_4DP with the latent loss, fused: forward(h, target, mask=None).

    Holds weight [out_features, in_features] and bias like nn.Linear (same init), and returns the
    loss of h @ weight.T + bias against target (see fused_linear_latent_loss).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, kind: str = "smooth_l1",
                 beta: float = 1.0, reduction: str = "mean", chunk_size: Optional[int] = None,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        lin = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight = lin.weight
        self.bias = lin.bias
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.beta, self.reduction, self.chunk_size, self.backend = kind, beta, reduction, chunk_size, backend

    def forward(self, h: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return fused_linear_latent_loss(h, self.weight, self.bias, target, kind=self.kind, beta=self.beta, mask=mask,
                                        reduction=self.reduction, chunk_size=self.chunk_size, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kind={self.kind!r}, reduction={self.reduction!r}")
