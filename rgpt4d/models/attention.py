"""Attention backends for the student: sdpa (default), eager, flash-attn 2, xformers; and
`sdpa_attention`, transformers' "sdpa" attention function through rgpt4d.ops.attention, which the
student's SigLIP and Qwen2 and the teacher's VideoMAE attention modules call.

flash-attn 2 and xformers are optional (`pip install rgpt4d[gpu]`) and run only on CUDA. Asking for
one that cannot run here raises `AttentionBackendError` naming what is missing, before any model is
built. xformers is plugged into transformers through its `AttentionInterface` as "xformers".
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rgpt4d.models.configs import ATTN_IMPLEMENTATIONS
from rgpt4d.ops import attention
from rgpt4d.ops.attn import attention_backend


class AttentionBackendError(RuntimeError):
    """The requested attention implementation cannot run in this environment."""


def _cuda_ok() -> bool:
    return torch.cuda.is_available()


def check_attn_implementation(name: str, device: Optional[torch.device | str] = None) -> None:
    """Raise AttentionBackendError if `name` cannot run on `device` (default: CUDA if present, else CPU)."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise AttentionBackendError(f"attn_implementation: unknown {name!r}; choose from {ATTN_IMPLEMENTATIONS}")
    if name in ("sdpa", "eager"):
        return
    dev = torch.device(device) if device is not None else torch.device("cuda" if _cuda_ok() else "cpu")
    package = {"flash_attention_2": "flash_attn", "xformers": "xformers"}[name]
    try:
        importlib.import_module(package)
    except ImportError as e:
        raise AttentionBackendError(
            f"attn_implementation={name!r} needs the {package!r} package, which is not installed "
            f"({e}); install the GPU extra (pip install 'rgpt4d[gpu]') or use 'sdpa'") from None
    if dev.type != "cuda" or not _cuda_ok():
        raise AttentionBackendError(
            f"attn_implementation={name!r}: {package} is installed but has no kernel on {dev.type.upper()} "
            f"(it runs only on CUDA GPUs{'' if _cuda_ok() else '; no CUDA device is available here'}); "
            f"use 'sdpa' here")


def _xformers_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function over xformers' memory-efficient kernel.
    query/key/value [B, H, L, D] -> ([B, L, H, D], None)."""
    import xformers.ops as xops  # optional: xformers (the gpu extra); checked by check_attn_implementation

    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat the kv heads
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    bias = None
    if attention_mask is not None:
        bias = attention_mask[:, :, :, : k.shape[1]].to(q.dtype).expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    elif getattr(module, "is_causal", False) and q.shape[1] > 1:
        bias = xops.LowerTriangularMask()
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout if module.training else 0.0,
                                          scale=scaling)
    return out, None


_registered = False


def resolve_attn_implementation(name: str, device: Optional[torch.device | str] = None) -> str:
    """Check `name` and return the transformers attn_implementation string to build models with."""
    global _registered
    check_attn_implementation(name, device)
    if name == "xformers" and not _registered:
        AttentionInterface.register("xformers", _xformers_attention)
        _registered = True
    return name


def sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                   dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                   **kwargs) -> tuple[Tensor, None]:
    """transformers' "sdpa" attention function (query/key/value [B, H, L, D] -> ([B, L, H, Dv], None))
    through rgpt4d.ops.attention when the process-wide backend gives a compiled kernel for it; with
    backend eager (and for what the op does not cover: dropout, position bias, softcap) it is
    transformers' own sdpa_attention_forward, unchanged. The same causal rule as transformers':
    causal when more than one query, no mask and a causal module; grouped-query heads natively."""
    if (attention_backend(query.device) == "eager" or (dropout and module.training)
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1 and attention_mask is None
    out = attention(query, key, value, attention_mask, causal=causal, scale=scaling, validate=False)
    return out.transpose(1, 2), None  # [B, L, H, Dv]: contiguous for the cpu backend, no copy


def attention_function(module: nn.Module, eager_fn):
    """The attention function a transformers attention module calls: sdpa_attention (the op) under
    "sdpa", else transformers' registered implementation (eager_fn: the model's own eager one)."""
    impl = module.config._attn_implementation
    return sdpa_attention if impl == "sdpa" else ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_fn)
