"""Timestamp Positional Encoding (TPE) ops: public API, eager references, autograd, registration.

Paper variant (sinusoidal, seconds):  p(n)[2i] = sin(t(n) / base^(2i/D)), p(n)[2i+1] = cos(...),
added to every token of frame n. Seed variant (learned): a table [L, D] indexed by integer frame
indices, `out = x + table[timestamps].unsqueeze(2)`.

Backends (rgpt4d/ops/registry.py): eager (this file), cpu/cuda (csrc/tpe/), triton (kernels/tpe.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgpt4d.ops.registry import Family, acc_dtype, check_values

# ---------------------------------------------------------------------------------------------
# Eager references (readable; the tests run them in float64 as the oracle)
# ---------------------------------------------------------------------------------------------


def tpe_sinusoid(timestamps: Tensor, dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """The paper's encoding of `timestamps` seconds: [..., dim] in `dtype`."""
    d = torch.arange(dim, device=timestamps.device)
    two_i = (d - d % 2).to(dtype)
    inv_freq = torch.exp(-(two_i / dim) * math.log(base))
    angle = timestamps.to(dtype).unsqueeze(-1) * inv_freq
    return torch.where(d % 2 == 1, torch.cos(angle), torch.sin(angle))


def frame_encoding_eager(timestamps: Tensor, dim: int, table: Optional[Tensor], base: float,
                         dtype: torch.dtype) -> Tensor:
    """[B, T, D] encoding per frame, in `dtype`."""
    if table is not None:
        return table[timestamps.long()].to(dtype)
    return tpe_sinusoid(timestamps, dim, base, dtype)


def tpe_add_eager(x: Tensor, timestamps: Tensor, table: Optional[Tensor] = None, base: float = 10000.0) -> Tensor:
    acc = acc_dtype(x.dtype)
    enc = frame_encoding_eager(timestamps, x.shape[-1], table, base, acc)
    return (x.to(acc) + enc.unsqueeze(2)).to(x.dtype)


def tpe_downsample_layernorm_eager(x: Tensor, timestamps: Tensor, table: Optional[Tensor] = None,
                                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
                                   grid: tuple[int, int], window: int = 3, eps: float = 1e-5,
                                   base: float = 10000.0) -> Tensor:
    """Add the encoding, zero-pad the h x w grid to multiples of `window` (bottom/right),
    concatenate each window x window neighbourhood into one token, LayerNorm over window^2 * D."""
    B, T, _, D = x.shape
    h, w = grid
    acc = acc_dtype(x.dtype)
    v = tpe_add_eager(x.to(acc), timestamps, table, base).reshape(B * T, h, w, D)
    Ho, Wo = -(-h // window), -(-w // window)
    v = F.pad(v, (0, 0, 0, Wo * window - w, 0, Ho * window - h))
    v = v.reshape(B * T, Ho, window, Wo, window, D).permute(0, 1, 3, 2, 4, 5).reshape(B, T, Ho * Wo, window * window * D)
    out = F.layer_norm(v, (v.shape[-1],), None if weight is None else weight.to(acc),
                       None if bias is None else bias.to(acc), eps)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _validate(op: str, x: Tensor, timestamps: Tensor, table: Optional[Tensor], values: bool) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    if not isinstance(timestamps, Tensor):
        raise TypeError(f"{op}: timestamps must be a Tensor [B, T], got {type(timestamps).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [B, T, N, D] (N tokens or regions per frame), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    B, T = x.shape[:2]
    if tuple(timestamps.shape) != (B, T):
        raise ValueError(f"{op}: timestamps must be [B, T] = [{B}, {T}] to match x, got shape {tuple(timestamps.shape)}")
    if timestamps.device != x.device:
        raise ValueError(f"{op}: timestamps must be on x's device {x.device}, got {timestamps.device}")
    if table is not None:
        if not isinstance(table, Tensor) or table.dim() != 2 or table.shape[1] != x.shape[3]:
            shape = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
            raise ValueError(f"{op}: table must be [L, D] with D = x.size(3) = {x.shape[3]}, got {shape}")
        if not table.is_floating_point():
            raise TypeError(f"{op}: table must be a floating-point tensor, got {table.dtype}")
        if table.device != x.device:
            raise ValueError(f"{op}: table must be on x's device {x.device}, got {table.device}")
        if timestamps.is_floating_point() or timestamps.dtype == torch.bool or timestamps.is_complex():
            raise TypeError(f"{op}: with a table, timestamps must be integer frame indices into it, got "
                            f"{timestamps.dtype}")
        if values and timestamps.numel() > 0:
            lo, hi = torch.aminmax(timestamps)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= table.shape[0]:
                raise IndexError(f"{op}: timestamps must index rows of table in [0, {table.shape[0]}), "
                                 f"got values in [{lo}, {hi}]")
    else:
        if not timestamps.is_floating_point():
            raise TypeError(f"{op}: without a table, timestamps must be float seconds (the sinusoidal TPE), got "
                            f"{timestamps.dtype}; pass `table` for integer frame indices, or convert with .float()")
        if values and timestamps.numel() > 0 and not bool(torch.isfinite(timestamps).all()):
            raise ValueError(f"{op}: timestamps must be finite seconds, got non-finite values (nan/inf)")


# ---------------------------------------------------------------------------------------------
# Declaration: schemas, fake functions, autograd (csrc/tpe/ and kernels/tpe.py implement them)
# ---------------------------------------------------------------------------------------------


def _fake_tpe_add(x, timestamps, table, base):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_tpe_add_(x, timestamps, table, base):
    return None


def _fake_table_backward(grad, timestamps, num_rows, deterministic):
    return grad.new_empty((num_rows, grad.shape[3]), dtype=acc_dtype(grad.dtype))


def _ds_shapes(x, h, w, window):
    B, T, _, D = x.shape
    return B, T, (-(-h // window)) * (-(-w // window)), window * window * D


def _fake_ds_ln(x, timestamps, table, weight, bias, h, w, window, eps, base):
    B, T, M, K = _ds_shapes(x, h, w, window)
    acc = acc_dtype(x.dtype)
    return x.new_empty((B, T, M, K)), x.new_empty((B, T, M), dtype=acc), x.new_empty((B, T, M), dtype=acc)


def _fake_ds_ln_backward(grad_out, x, timestamps, table, weight, mean, rstd, h, w, window, base,
                         need_input_grad, need_weight_grad, need_bias_grad):
    _, _, _, K = _ds_shapes(x, h, w, window)
    acc = acc_dtype(x.dtype)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_input_grad else x.new_empty((0,))
    gw = x.new_empty((K,), dtype=acc) if (need_weight_grad and weight is not None) else x.new_empty((0,), dtype=acc)
    gb = x.new_empty((K,), dtype=acc) if need_bias_grad else x.new_empty((0,), dtype=acc)
    return gx, gw, gb


def _setup_tpe_add(ctx, inputs, output):
    x, timestamps, table, base = inputs
    ctx.num_rows = 0 if table is None else table.shape[0]
    ctx.table_dtype = None if table is None else table.dtype
    ctx.save_for_backward(timestamps if table is not None else None)


def _tpe_add_backward(ctx, grad):
    grad_table = None
    if ctx.needs_input_grad[2]:
        (timestamps,) = ctx.saved_tensors
        det = torch.are_deterministic_algorithms_enabled()
        grad_table = ctx.ops.tpe_table_backward(grad, timestamps, ctx.num_rows, det).to(ctx.table_dtype)
    # d(x + enc)/dx is the identity: grad_x is grad_out itself, no copy.
    return grad, None, grad_table, None


def _setup_ds_ln(ctx, inputs, output):
    x, timestamps, table, weight, bias, h, w, window, eps, base = inputs
    _, mean, rstd = output
    ctx.geom = (h, w, window, base)
    ctx.num_rows = 0 if table is None else table.shape[0]
    ctx.table_dtype = None if table is None else table.dtype
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, timestamps, table, weight, mean, rstd)


def _ds_ln_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, timestamps, table, weight, mean, rstd = ctx.saved_tensors
    h, w, window, base = ctx.geom
    need_x, _, need_table, need_w, need_b = ctx.needs_input_grad[:5]
    gx, gw, gb = ctx.ops.tpe_ds_ln_backward(grad_out, x, timestamps, table, weight, mean, rstd, h, w, window, base,
                                            need_x or need_table, need_w, need_b)
    grad_table = None
    if need_table:
        det = torch.are_deterministic_algorithms_enabled()
        grad_table = ctx.ops.tpe_table_backward(gx, timestamps, ctx.num_rows, det).to(ctx.table_dtype)
    return (gx if need_x else None, None, grad_table,
            gw.to(ctx.weight_dtype) if need_w else None,
            gb.to(ctx.bias_dtype) if need_b else None,
            None, None, None, None, None)


def _triton_tpe_add_(K, x, timestamps, table, base):
    if x.is_contiguous():
        K.tpe_add(x, timestamps, table, base, out=x)
    else:
        x.copy_(K.tpe_add(x, timestamps, table, base))


TPE = Family("tpe", cuda_preference=("cuda", "triton"))
TPE_ADD = TPE.op("tpe_add", "(Tensor x, Tensor timestamps, Tensor? table, float base) -> Tensor",
                 fake=_fake_tpe_add, triton=lambda K, *a: K.tpe_add(*a),
                 autograd=(_setup_tpe_add, _tpe_add_backward))
TPE_ADD_ = TPE.op("tpe_add_", "(Tensor(a!) x, Tensor timestamps, Tensor? table, float base) -> ()",
                  fake=_fake_tpe_add_, triton=_triton_tpe_add_)
TPE.op("tpe_table_backward", "(Tensor grad, Tensor timestamps, int num_rows, bool deterministic) -> Tensor",
       fake=_fake_table_backward, triton=lambda K, *a: K.tpe_table_grad(*a))
TPE_DS_LN = TPE.op("tpe_ds_ln", "(Tensor x, Tensor timestamps, Tensor? table, Tensor? weight, Tensor? bias, int h, "
                   "int w, int window, float eps, float base) -> (Tensor, Tensor, Tensor)",
                   fake=_fake_ds_ln, triton=lambda K, *a: K.tpe_ds_ln_fwd(*a),
                   autograd=(_setup_ds_ln, _ds_ln_backward), api="tpe_downsample_layernorm")
TPE.op("tpe_ds_ln_backward", "(Tensor grad_out, Tensor x, Tensor timestamps, Tensor? table, Tensor? weight, "
       "Tensor mean, Tensor rstd, int h, int w, int window, float base, bool need_input_grad, "
       "bool need_weight_grad, bool need_bias_grad) -> (Tensor, Tensor, Tensor)",
       fake=_fake_ds_ln_backward, triton=lambda K, *a: K.tpe_ds_ln_bwd(*a))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def tpe_add(x: Tensor, timestamps: Tensor, table: Optional[Tensor] = None, *, base: float = 10000.0,
            backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """Add the Timestamp Positional Encoding of each frame to all its tokens.

    Args:
        x: [B, T, N, D] features (N tokens or regions per frame), any float dtype.
        timestamps: [B, T]. Without `table`: float seconds (the paper's sinusoidal TPE, computed in
            the kernel). With `table`: integer row indices into it (the learned variant).
        table: optional [L, D] learned encoding table.
        base: the sinusoid base (10000 in the paper).
        backend: "eager" | "cpu" | "triton" | "cuda" | None (automatic).
        validate: check shapes, dtypes, devices, index range and finiteness (reads the timestamps:
            a device sync on GPU). False skips the checks; the caller guarantees them.

    Returns x's dtype and shape (contiguous); arithmetic in fp32 (fp64 for fp64 x). Gradients:
    grad_x is grad_out itself; grad_table sums over tokens into the frames' rows (deterministic
    under torch.use_deterministic_algorithms(True)); timestamps get none.
    """
    if validate:
        _validate("tpe_add", x, timestamps, table, check_values())
    be = TPE_ADD.select(x.device, backend)
    if be == "eager":
        return tpe_add_eager(x, timestamps, table, base)
    return TPE_ADD(be, x, timestamps, table, float(base))


def tpe_add_(x: Tensor, timestamps: Tensor, table: Optional[Tensor] = None, *, base: float = 10000.0,
             backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """In-place :func:`tpe_add` for inference (no autograd). Returns x."""
    if validate:
        _validate("tpe_add_", x, timestamps, table, check_values())
    if torch.is_grad_enabled() and (x.requires_grad or (table is not None and table.requires_grad)):
        raise RuntimeError("tpe_add_: the in-place op is for inference; x or table requires grad here. Use tpe_add, "
                           "or call it under torch.no_grad() / torch.inference_mode()")
    be = TPE_ADD_.select(x.device, backend)
    if be == "eager":
        x.copy_(tpe_add_eager(x, timestamps, table, base))
    else:
        TPE_ADD_(be, x, timestamps, table, float(base))
    return x


def tpe_downsample_layernorm(x: Tensor, timestamps: Tensor, table: Optional[Tensor] = None,
                             weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
                             grid: tuple[int, int], window: int = 3, eps: float = 1e-5, base: float = 10000.0,
                             backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """The fused projector prologue: TPE -> window x window downsample -> LayerNorm.

    x [B, T, h*w, D] (tokens row-major over the h x w grid) -> [B, T, ceil(h/win)*ceil(w/win), win^2*D].
    The grid is zero-padded at the bottom/right after the encoding is added; inside an output
    token, channel (dy*win + dx)*D + d holds feature d of the token at offset (dy, dx) of its
    window (NVILA's downsample convention); LayerNorm over all win^2*D channels with optional
    weight/bias [win^2*D]. Gradients to x, table, weight and bias.
    """
    if validate:
        _validate("tpe_downsample_layernorm", x, timestamps, table, check_values())
        _validate_ds(x, weight, bias, grid, window, eps)
    h, w = int(grid[0]), int(grid[1])
    be = TPE_DS_LN.select(x.device, backend)
    if be == "eager":
        return tpe_downsample_layernorm_eager(x, timestamps, table, weight, bias, grid=(h, w), window=window,
                                              eps=eps, base=base)
    out, _, _ = TPE_DS_LN(be, x, timestamps, table, weight, bias, h, w, int(window), float(eps), float(base))
    return out


def _validate_ds(x, weight, bias, grid, window, eps) -> None:
    op = "tpe_downsample_layernorm"
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g >= 1 for g in grid)):
        raise ValueError(f"{op}: grid must be a pair of positive ints (h, w), got {grid!r}")
    if grid[0] * grid[1] != x.shape[2]:
        raise ValueError(f"{op}: grid {tuple(grid)} has {grid[0] * grid[1]} tokens but x.size(2) = {x.shape[2]}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"{op}: window must be a positive int, got {window!r}")
    if not eps > 0:
        raise ValueError(f"{op}: eps must be > 0, got {eps!r}")
    K = window * window * x.shape[3]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != (K,):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be [window^2 * D] = [{K}], got {shape}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {t.device}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class TimestampPositionalEncoding(nn.Module):
    """TPE as a module, with the seed's interface: forward(regional_features [B, T, R, D], timestamps [B, T]).

    mode="learned": a table `encoding` = zeros(max_len, d_model) (an nn.Parameter), indexed by integer
    frame indices: `out = regional_features + encoding[timestamps].unsqueeze(2)`.
    mode="sinusoidal": timestamps are seconds; the paper's fixed encoding, no parameters.
    """

    def __init__(self, d_model: int, max_len: int = 500, mode: str = "learned", base: float = 10000.0,
                 backend: Optional[str] = None):
        super().__init__()
        if mode not in ("learned", "sinusoidal"):
            raise ValueError(f"TimestampPositionalEncoding: mode must be 'learned' or 'sinusoidal', got {mode!r}")
        self.d_model, self.max_len, self.mode, self.base, self.backend = d_model, max_len, mode, base, backend
        if mode == "learned":
            self.encoding = nn.Parameter(torch.zeros(max_len, d_model))
        else:
            self.register_parameter("encoding", None)

    def forward(self, regional_features: Tensor, timestamps: Tensor) -> Tensor:
        return tpe_add(regional_features, timestamps, self.encoding, base=self.base, backend=self.backend)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, mode={self.mode!r}" + (f", max_len={self.max_len}" if self.mode == "learned"
                                                                  else f", base={self.base}")


class TPEDownsampleLayerNorm(nn.Module):
    """The projector prologue as a module: TPE (sinusoidal seconds, or learned) + window downsample + LayerNorm.

    forward(x [B, T, h*w, D], timestamps [B, T], grid=(h, w)) -> [B, T, M, window^2 * D].
    """

    def __init__(self, dim: int, window: int = 3, eps: float = 1e-5, mode: str = "sinusoidal", max_len: int = 500,
                 base: float = 10000.0, elementwise_affine: bool = True, backend: Optional[str] = None):
        super().__init__()
        if mode not in ("learned", "sinusoidal"):
            raise ValueError(f"TPEDownsampleLayerNorm: mode must be 'learned' or 'sinusoidal', got {mode!r}")
        self.dim, self.window, self.eps, self.mode, self.base, self.backend = dim, window, eps, mode, base, backend
        K = window * window * dim
        self.weight = nn.Parameter(torch.ones(K)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(K)) if elementwise_affine else None
        self.encoding = nn.Parameter(torch.zeros(max_len, dim)) if mode == "learned" else None

    def forward(self, x: Tensor, timestamps: Tensor, grid: tuple[int, int]) -> Tensor:
        return tpe_downsample_layernorm(x, timestamps, self.encoding, self.weight, self.bias, grid=grid,
                                        window=self.window, eps=self.eps, base=self.base, backend=self.backend)
