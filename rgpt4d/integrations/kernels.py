"""rgpt4d kernels inside a user's transformers MLLM, the way Liger patches models.

    from rgpt4d.integrations.kernels import apply_kernels, remove_kernels
    apply_kernels(model)      # in place; a second call does nothing
    remove_kernels(model)     # the original modules again: outputs bit-identical to before

What `apply_kernels(model)` swaps, in the language model only (the vision tower is left as it is):

- every RMSNorm whose forward is transformers' Llama RMSNorm (LlamaRMSNorm, Qwen2RMSNorm,
  MistralRMSNorm, Qwen2VLRMSNorm, Qwen3VLTextRMSNorm incl. Qwen3's per-head q_norm / k_norm, ...)
  -> rgpt4d.ops.rms_norm;
- every MLP whose forward is Llama's down_proj(act_fn(gate_proj(x)) * up_proj(x)) with a SiLU
  act_fn -> down_proj(rgpt4d.ops.swiglu(gate_proj(x), up_proj(x)));
- every attention whose forward calls the module's Llama-style `apply_rotary_pos_emb` ->
  rgpt4d.ops.rope (q and k rotated in one op). For the Qwen-VL family this is M-RoPE: in this
  transformers the rotary-embedding module already merges the temporal / height / width frequency
  sections (mrope_section; interleaved for Qwen3-VL) into one cos / sin [B, L, head_dim] per
  forward, and the per-layer rotation that follows is the plain one rgpt4d.ops.rope computes. The
  section merge itself (once per forward, not per layer) stays transformers' code;
- in training with labels (`model.train()` and `labels=` passed by keyword), the LM head and the
  causal-LM loss -> rgpt4d.ops.fused_linear_cross_entropy: the same loss as transformers'
  ForCausalLMLoss (labels shifted by one, ignore_index -100, mean over labelled tokens, or the sum
  over `num_items_in_batch` when that is passed; `shift_labels=` is honoured), without the
  [B, L, V] logits. `outputs.logits` is then None (as with Liger's fused linear cross-entropy);
  in eval mode or without labels the LM head runs as before and the logits are returned.

A module is swapped only when its forward is, bytecode for bytecode, transformers' Llama code
(compared at patch time), so a model whose norm, MLP or rotary differ (Gemma's 1 + weight, fused
gate_up projections, partial rotary) is refused with a TypeError naming the class and what is
missing, instead of being patched into something that computes other numbers.

The swapped modules keep their parameters, buffers and names (state dicts are unchanged); their
class becomes a subclass of the original (`isinstance` still holds), so deep copies work but a
pickled patched model needs rgpt4d to unpickle. The ops run on the process-wide rgpt4d backend
(rgpt4d.ops.set_backend / RGPT4D_BACKEND): the compiled kernels by default, the plain-PyTorch
references with backend "eager".
"""

from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgpt4d.ops import fused_linear_cross_entropy, rms_norm, rope, swiglu
from rgpt4d.ops.lm import IGNORE_INDEX

_STATE = "_rgpt4d_kernels"
_ROPE_NAME = "apply_rotary_pos_emb"


# ---------------------------------------------------------------------------------------------
# What transformers' Llama code is (the reference every swapped module must match)
# ---------------------------------------------------------------------------------------------


def _signature(fn) -> Optional[tuple]:
    """What a function computes, given the same globals: its bytecode, the names it reads and its
    non-string constants (docstrings and comments may differ between transformers' copies)."""
    code = getattr(getattr(fn, "__wrapped__", fn), "__code__", None)
    if code is None:  # not a Python function (a builtin, a callable object): nothing to compare
        return None
    return code.co_code, code.co_names, tuple(c for c in code.co_consts if not isinstance(c, str))


def _llama():
    # start-up: transformers' Llama modelling module, needed only when a Llama-family model is patched
    from transformers.models.llama import modeling_llama as m

    return m


def _is_llama_rms_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (isinstance(w, Tensor) and w.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None), float)
            and _signature(type(module).forward) == _signature(_llama().LlamaRMSNorm.forward))


def _is_silu(act) -> bool:
    return act is F.silu or type(act).__name__ in ("SiLU", "SiLUActivation")


def _is_swiglu_mlp(module: nn.Module) -> bool:
    return (all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
            and _is_silu(getattr(module, "act_fn", None))
            and _signature(type(module).forward) == _signature(_llama().LlamaMLP.forward))


def _forward_functions(fn):
    """fn and the functions its closures wrap (decorators such as deprecate_kwarg), outermost first."""
    out, seen = [], set()
    while isinstance(fn, types.FunctionType) and id(fn) not in seen:
        seen.add(id(fn))
        out.append(fn)
        inner = getattr(fn, "__wrapped__", None)
        if inner is None:
            cells = [c.cell_contents for c in (fn.__closure__ or ()) if isinstance(c.cell_contents, types.FunctionType)]
            inner = cells[0] if len(cells) == 1 else None
        fn = inner
    return out


def _rope_function(attn_cls) -> Optional[types.FunctionType]:
    """The Llama-style apply_rotary_pos_emb the attention's forward calls, or None."""
    for fn in _forward_functions(attn_cls.forward):
        if _ROPE_NAME in fn.__code__.co_names:
            g = fn.__globals__.get(_ROPE_NAME)
            rot = fn.__globals__.get("rotate_half")
            m = _llama()
            if (isinstance(g, types.FunctionType) and _signature(g) == _signature(m.apply_rotary_pos_emb)
                    and isinstance(rot, types.FunctionType) and _signature(rot) == _signature(m.rotate_half)):
                return g
    return None


# ---------------------------------------------------------------------------------------------
# The swapped forwards
# ---------------------------------------------------------------------------------------------


def _rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_mlp_forward(self, x: Tensor) -> Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb through rgpt4d.ops.rope."""
    return rope(q, k, cos, sin, unsqueeze_dim)


def _with_rope(fn: types.FunctionType, old) -> types.FunctionType:
    """A copy of fn (and of the functions its decorators wrap) whose global apply_rotary_pos_emb is
    rgpt4d's: the attention's own forward code, with only the rotation swapped. The copy's globals
    are a snapshot of the modeling module's, taken at patch time."""
    closure = fn.__closure__
    if closure:
        closure = tuple(types.CellType(_with_rope(c.cell_contents, old))
                        if isinstance(c.cell_contents, types.FunctionType) and _calls(c.cell_contents, old) else c
                        for c in closure)
    g = fn.__globals__
    if g.get(_ROPE_NAME) is old and _ROPE_NAME in fn.__code__.co_names:
        g = dict(g)
        g[_ROPE_NAME] = _rope
    new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    if "__wrapped__" in fn.__dict__ and _calls(fn.__wrapped__, old):
        new.__wrapped__ = _with_rope(fn.__wrapped__, old)
    return new


def _calls(fn, old) -> bool:
    return any(f.__globals__.get(_ROPE_NAME) is old and _ROPE_NAME in f.__code__.co_names
               for f in _forward_functions(fn))


class _LMHead:
    """Mixin of the swapped LM head: F.linear as nn.Linear, or, while the model's forward is on the
    fused-loss path, the hidden states themselves (the model returns them in place of the logits
    and the loss is computed from them and the head's weight)."""

    _rgpt4d_pass_hidden = False

    def forward(self, x: Tensor) -> Tensor:
        if self._rgpt4d_pass_hidden:
            return x
        return F.linear(x, self.weight, self.bias)


_SUBCLASSES: dict = {}


def _subclass(cls: type, kind: str, attrs: dict) -> type:
    """One subclass per (original class, kind), named after the original (so `repr` shows both)."""
    key = (cls, kind)
    if key not in _SUBCLASSES:
        bases = (_LMHead, cls) if kind == "lm_head" else (cls,)
        _SUBCLASSES[key] = type(f"Rgpt4d{cls.__name__}", bases, dict(attrs, __module__=__name__,
                                                                   _rgpt4d_original=cls))
    return _SUBCLASSES[key]


# ---------------------------------------------------------------------------------------------
# The fused LM head + loss (forward hooks on the model: they compose with other wrappers of forward)
# ---------------------------------------------------------------------------------------------


class _State:
    def __init__(self):
        self.swapped: list[tuple[nn.Module, type]] = []  # (module, its original class)
        self.handles: list = []
        self.lm_head: Optional[nn.Module] = None
        self.labels: Optional[Tensor] = None
        self.shift_labels: Optional[Tensor] = None
        self.num_items: Optional[Tensor] = None
        self.counts: dict = {}


def _pre_hook(state: _State):
    def hook(module, args, kwargs):
        head = state.lm_head
        head._rgpt4d_pass_hidden = False
        state.labels = state.shift_labels = state.num_items = None
        if not module.training or (kwargs.get("labels") is None and kwargs.get("shift_labels") is None):
            return None
        kwargs = dict(kwargs)
        state.labels = kwargs.pop("labels", None)
        state.shift_labels = kwargs.pop("shift_labels", None)
        state.num_items = kwargs.pop("num_items_in_batch", None)
        head._rgpt4d_pass_hidden = True
        return args, kwargs
    return hook


def _post_hook(state: _State):
    def hook(module, args, kwargs, output):
        head = state.lm_head
        if not head._rgpt4d_pass_hidden:
            return None
        head._rgpt4d_pass_hidden = False
        labels, shift, n = state.labels, state.shift_labels, state.num_items
        state.labels = state.shift_labels = state.num_items = None
        if output is None:  # the forward raised (always_call): only the flag is reset
            return None
        hidden = output[0] if isinstance(output, tuple) else output.logits
        if shift is None:  # transformers' ForCausalLMLoss: position t predicts labels[t + 1]
            shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        shift = shift.to(hidden.device)
        if n is None:
            loss = fused_linear_cross_entropy(hidden, head.weight, shift, head.bias)
        else:  # the sum over the batch's labelled tokens over the whole step's count (fixed_cross_entropy)
            n = n.to(hidden.device) if isinstance(n, Tensor) else n
            loss = fused_linear_cross_entropy(hidden, head.weight, shift, head.bias, reduction="sum") / n
        if isinstance(output, tuple):
            return (loss,) + output[1:]
        output.logits = None
        output.loss = loss
        return output
    return hook


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _language_model(model: nn.Module) -> Optional[nn.Module]:
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        lm = getattr(inner, "language_model", None)
        return lm if isinstance(lm, nn.Module) else inner
    lm = getattr(model, "language_model", None)
    return lm if isinstance(lm, nn.Module) else None


def apply_kernels(model: nn.Module) -> None:
    """Swap the language model's RMSNorms, SwiGLU MLPs and rotary embeddings for rgpt4d ops, and in
    training with labels its LM head + causal-LM loss for rgpt4d.ops.fused_linear_cross_entropy
    (module docstring). In place; a second call does nothing; `remove_kernels` undoes it.

    Raises TypeError, naming the model's class and what it lacks, when the model has no language
    model (`model.model.language_model` or `model.model`), no Linear `lm_head`, or its language
    model has no Llama-style RMSNorm, SiLU MLP or rotary attention."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_kernels: model must be a torch.nn.Module (a transformers model), got "
                        f"{type(model).__name__}")
    if getattr(model, _STATE, None) is not None:
        return
    name = type(model).__name__
    lm = _language_model(model)
    if lm is None:
        raise TypeError(f"apply_kernels: {name} has no language model (expected `model.model.language_model` "
                        f"or `model.model`, as transformers' causal LMs and MLLMs have)")
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"apply_kernels: {name} has no nn.Linear `lm_head` (got {type(head).__name__}); the fused "
                        f"LM head + cross-entropy needs one")
    norms, mlps, attns = [], [], []
    for module in lm.modules():
        if _is_llama_rms_norm(module):
            norms.append(module)
        elif _is_swiglu_mlp(module):
            mlps.append(module)
        elif isinstance(getattr(type(module), "forward", None), types.FunctionType) and _rope_function(type(module)):
            attns.append(module)
    missing = [what for what, found in (
        ("an RMSNorm computing Llama's weight * x * rsqrt(mean(x^2) + eps) (e.g. LlamaRMSNorm, Qwen2RMSNorm)", norms),
        ("an MLP computing Llama's down_proj(silu(gate_proj(x)) * up_proj(x)) (e.g. LlamaMLP, Qwen2MLP)", mlps),
        ("an attention calling Llama's apply_rotary_pos_emb on q and k (e.g. LlamaAttention, Qwen2VLAttention)",
         attns)) if not found]
    if missing:
        raise TypeError(f"apply_kernels: {name} is not supported: its language model {type(lm).__name__} lacks "
                        + "; and ".join(missing))

    state = _State()
    for module in norms:
        state.swapped.append((module, type(module)))
        module.__class__ = _subclass(type(module), "rms_norm", {"forward": _rms_norm_forward})
    for module in mlps:
        state.swapped.append((module, type(module)))
        module.__class__ = _subclass(type(module), "swiglu", {"forward": _swiglu_mlp_forward})
    for module in attns:
        cls = type(module)
        if (cls, "rope") not in _SUBCLASSES:
            _subclass(cls, "rope", {"forward": _with_rope(cls.forward, _rope_function(cls))})
        state.swapped.append((module, cls))
        module.__class__ = _SUBCLASSES[(cls, "rope")]
    state.swapped.append((head, type(head)))
    head.__class__ = _subclass(type(head), "lm_head", {})
    state.lm_head = head
    state.handles.append(model.register_forward_pre_hook(_pre_hook(state), with_kwargs=True))
    state.handles.append(model.register_forward_hook(_post_hook(state), with_kwargs=True, always_call=True))
    state.counts = {"rms_norm": len(norms), "swiglu": len(mlps), "rope": len(attns), "lm_head": 1}
    object.__setattr__(model, _STATE, state)


def remove_kernels(model: nn.Module) -> None:
    """Undo apply_kernels: every swapped module gets its original class back and the hooks are
    removed, so the model computes exactly what it did before. Does nothing on an unpatched model."""
    state = getattr(model, _STATE, None)
    if state is None:
        return
    for h in state.handles:
        h.remove()
    for module, cls in state.swapped:
        module.__class__ = cls
        module.__dict__.pop("_rgpt4d_pass_hidden", None)
    object.__delattr__(model, _STATE)


def kernels_applied(model: nn.Module) -> dict:
    """{op: number of modules swapped} for a patched model, {} otherwise."""
    state = getattr(model, _STATE, None)
    return dict(state.counts) if state is not None else {}
