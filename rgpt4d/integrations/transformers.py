"""Drop-in 4D-RGPT parts for a user's own transformers MLLM (LLaVA-style: vision tower ->
`multi_modal_projector` -> language model), using the project's ops.

    from rgpt4d.integrations.transformers import apply_rgpt4d
    apply_rgpt4d(model)                                   # TPE; region tokens with obj_token_ids=[...]
    out = model(input_ids=ids, pixel_values=frames, timestamps=secs)   # one timestamp per image
    gen = model.generate(input_ids=ids, pixel_values=frames, timestamps=secs, max_new_tokens=4)

What the patch does:
- TPE: with `timestamps` (seconds, one per image of `pixel_values`: each video frame is an image;
  shape [num_images] or [B, T]), the paper's sinusoidal encoding of each image's timestamp is added
  (rgpt4d.ops.tpe_add) to that image's vision features on their way into the projector (a forward
  pre-hook on the projector). Without `timestamps` the model runs exactly as before.
- Regions (optional, `obj_token_ids`): with `boxes` [B, R, 4] (first-frame pixels of the images),
  region tokens (RegionalEncoder4D: rgpt4d.ops.region_pool over every frame's feature grid, TPE
  fused; mean over frames, MLP; new trainable parameters `rgpt4d_region_encoder`) replace the embeddings at the `<obj_N>`
  tokens before the language model.
- P4D: `attach_p4d(model, teacher_dim, teacher_grid)` adds a training-only D_4DP
  (`rgpt4d_p4d`), `p4d_latent_loss(...)` computes L_LD from the model's last hidden states, and
  `detach_p4d(model)` removes it; `remove_rgpt4d(model)` undoes everything.
"""

from __future__ import annotations

import inspect
import types
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from rgpt4d.ops import tpe_add

_STATE = "_rgpt4d_state"


def _projector(model: nn.Module) -> nn.Module:
    for owner in (model, getattr(model, "model", None)):
        if owner is not None and hasattr(owner, "multi_modal_projector"):
            return owner.multi_modal_projector
    raise TypeError(f"apply_rgpt4d: {type(model).__name__} has no `multi_modal_projector` (LLaVA-style model expected)")


def _language_model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    if hasattr(inner, "language_model"):
        return inner.language_model
    raise TypeError(f"apply_rgpt4d: {type(model).__name__} has no `language_model`")


def _vision_dim(model: nn.Module) -> int:
    vc = model.config.vision_config
    return int(getattr(vc, "hidden_size"))


class _State:
    def __init__(self):
        self.timestamps: Optional[Tensor] = None  # [B, T] seconds of the current call
        self.input_ids: Optional[Tensor] = None
        self.boxes: Optional[Tensor] = None
        self.region_mask: Optional[Tensor] = None
        self.features: Optional[Tensor] = None  # vision features [N, P, D] captured at the projector
        self.handles: list = []
        self.orig_forward = None
        self.orig_generate = None
        self.obj_token_ids: list[int] = []
        self.tpe_base = 10000.0
        self.image_size: int = 0


def _check_timestamps(timestamps, pixel_values: Optional[Tensor]) -> Tensor:
    t = torch.as_tensor(timestamps, dtype=torch.float32)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise ValueError(f"timestamps: expected [num_images] or [B, T] seconds, got shape {tuple(t.shape)}")
    if pixel_values is not None and t.numel() != pixel_values.shape[0]:
        raise ValueError(f"timestamps: one per image of pixel_values; got {t.numel()} timestamps for "
                         f"{pixel_values.shape[0]} images")
    if not torch.isfinite(t).all():
        raise ValueError("timestamps: must be finite seconds")
    return t


def _projector_pre_hook(state: _State):
    def hook(module, args):
        feats = args[0]
        state.features = feats
        if state.timestamps is None:
            return None
        t = state.timestamps.to(feats.device)
        N, P, D = feats.shape
        x = tpe_add(feats.reshape(t.shape[0], t.shape[1], P, D), t.to(feats.dtype), base=state.tpe_base)
        return (x.reshape(N, P, D),) + tuple(args[1:])
    return hook


def _language_model_pre_hook(model: nn.Module, state: _State):
    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if state.boxes is None or state.features is None or embeds is None or state.input_ids is None:
            return None
        ids = state.input_ids
        if embeds.shape[1] != ids.shape[1]:
            return None
        feats = state.features  # [N, P, D]
        B = ids.shape[0]
        N, P, D = feats.shape
        g = int(round(P ** 0.5))
        if g * g != P:
            raise ValueError(f"boxes: region tokens need a square feature grid, got {P} tokens per image")
        T = N // B
        ts = state.timestamps.to(feats.device) if state.timestamps is not None else None
        enc = model.rgpt4d_region_encoder
        grid = feats.reshape(B, T, g, g, D)
        valid = state.region_mask if state.region_mask is not None else torch.ones(state.boxes.shape[:2], dtype=torch.bool)
        # without timestamps the region tokens get the encoding of t = 0 s
        tokens = enc(grid, state.boxes.to(feats.device, feats.dtype), valid.to(feats.device),
                     ts if ts is not None else torch.zeros(B, T, device=feats.device))
        embeds = embeds.clone()
        obj = torch.tensor(state.obj_token_ids, device=ids.device)
        for b in range(B):
            for p in torch.isin(ids[b], obj).nonzero()[:, 0].tolist():
                n = state.obj_token_ids.index(int(ids[b, p]))
                if n >= state.boxes.shape[1] or not bool(valid[b, n]):
                    raise ValueError(f"input_ids: sample {b} refers to <obj_{n + 1}> but only "
                                     f"{int(valid[b].sum())} region(s) were given in boxes")
                embeds[b, p] = tokens[b, n].to(embeds.dtype)
        kwargs["inputs_embeds"] = embeds
        return args, kwargs
    return hook


def apply_rgpt4d(model: nn.Module, *, tpe: bool = True, tpe_base: float = 10000.0,
                 obj_token_ids: Optional[Sequence[int]] = None, region_hidden_size: Optional[int] = None) -> nn.Module:
    """Patch `model` in place (and return it): `timestamps=` (and `boxes=` with `obj_token_ids`) on
    forward and generate. Idempotent: a second call raises; `remove_rgpt4d` undoes it."""
    if hasattr(model, _STATE):
        raise RuntimeError("apply_rgpt4d: the model is already patched (call remove_rgpt4d first)")
    state = _State()
    state.tpe_base = tpe_base
    state.image_size = int(model.config.vision_config.image_size)
    projector = _projector(model)
    state.handles.append(projector.register_forward_pre_hook(_projector_pre_hook(state)))
    if obj_token_ids:
        from rgpt4d.models.student import RegionTokenEncoder

        text_dim = int(model.config.text_config.hidden_size)
        state.obj_token_ids = [int(i) for i in obj_token_ids]
        grid = state.image_size // int(model.config.vision_config.patch_size)
        model.rgpt4d_region_encoder = RegionTokenEncoder(_vision_dim(model), region_hidden_size or text_dim, text_dim,
                                                         tpe=True, base=tpe_base, spatial_scale=grid / state.image_size)
        state.handles.append(_language_model(model).register_forward_pre_hook(
            _language_model_pre_hook(model, state), with_kwargs=True))

    state.orig_forward = model.forward
    state.orig_generate = getattr(model, "generate", None)

    def _enter(kwargs):
        timestamps = kwargs.pop("timestamps", None)
        boxes = kwargs.pop("boxes", None)
        region_mask = kwargs.pop("region_mask", None)
        pv = kwargs.get("pixel_values")
        state.timestamps = _check_timestamps(timestamps, pv) if (timestamps is not None and tpe) else None
        if boxes is not None:
            if not state.obj_token_ids:
                raise ValueError("boxes: this model was patched without obj_token_ids (apply_rgpt4d(..., obj_token_ids=[...]))")
            boxes = torch.as_tensor(boxes, dtype=torch.float32)
            if boxes.dim() != 3 or boxes.shape[-1] != 4:
                raise ValueError(f"boxes: expected [B, R, 4] first-frame boxes, got {tuple(boxes.shape)}")
            S = state.image_size
            ok = (boxes[..., 0] >= 0) & (boxes[..., 1] >= 0) & (boxes[..., 2] <= S) & (boxes[..., 3] <= S)
            if region_mask is not None:
                ok = ok | ~region_mask.bool()
            if not ok.all():
                raise ValueError(f"boxes: must lie inside the {S}x{S} image (x0, y0, x1, y1 pixels)")
        state.boxes, state.region_mask = boxes, region_mask
        state.input_ids = kwargs.get("input_ids")
        state.features = None

    def _exit():
        state.timestamps = state.boxes = state.region_mask = state.input_ids = state.features = None

    def forward(self, *args, **kwargs):
        _enter(kwargs)
        try:
            return state.orig_forward(*args, **kwargs)
        finally:
            _exit()

    def generate(self, *args, **kwargs):
        _enter(kwargs)
        try:
            return state.orig_generate(*args, **kwargs)
        finally:
            _exit()

    # generate() checks its kwargs against forward's signature: keep the original one
    forward.__signature__ = inspect.signature(type(model).forward)
    model.forward = types.MethodType(forward, model)
    if state.orig_generate is not None:
        model.generate = types.MethodType(generate, model)
    object.__setattr__(model, _STATE, state)
    return model


def remove_rgpt4d(model: nn.Module) -> nn.Module:
    """Undo apply_rgpt4d (and attach_p4d): hooks, patched methods and added modules."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    for h in state.handles:
        h.remove()
    del model.forward
    if state.orig_generate is not None and "generate" in model.__dict__:
        del model.generate
    for name in ("rgpt4d_region_encoder", "rgpt4d_p4d"):
        if hasattr(model, name):
            delattr(model, name)
    object.__delattr__(model, _STATE)
    return model


# ---------------------------------------------------------------------------------------------
# P4D heads for training
# ---------------------------------------------------------------------------------------------


def attach_p4d(model: nn.Module, teacher_dim: int, teacher_grid: tuple[int, int, int], *, tubelet: int = 2,
               config=None) -> nn.Module:
    """Add the training-only D_4DP as `model.rgpt4d_p4d` (paper MLP by default)."""
    from rgpt4d.models.configs import P4DConfig
    from rgpt4d.models.p4d import P4DDecoder

    cfg = config or P4DConfig(hidden_size=2 * int(model.config.text_config.hidden_size))
    model.rgpt4d_p4d = P4DDecoder(int(model.config.text_config.hidden_size), teacher_dim, cfg)
    model.rgpt4d_p4d.teacher_grid, model.rgpt4d_p4d.tubelet = tuple(teacher_grid), tubelet
    return model


def detach_p4d(model: nn.Module) -> nn.Module:
    """Remove D_4DP: the model is the plain MLLM again (same parameters as before attach_p4d)."""
    if hasattr(model, "rgpt4d_p4d"):
        del model.rgpt4d_p4d
    return model


def p4d_latent_loss(model: nn.Module, hidden_states: Tensor, input_ids: Tensor, num_frames: int,
                    teacher_latent: Tensor, *, preset: str = "paper") -> Tensor:
    """alpha * L_LD from the last hidden states [B, L, D] at the image tokens (num_frames images per
    sample, square grids) against the teacher latent [B, T', h, w, C_t]; fused Linear + loss."""
    from rgpt4d.models.p4d import resample_to_teacher_grid
    from rgpt4d.ops import P4D_PRESETS, fused_linear_latent_loss

    dec = getattr(model, "rgpt4d_p4d", None)
    if dec is None:
        raise RuntimeError("p4d_latent_loss: no D_4DP attached (call attach_p4d first)")
    B, _, D = hidden_states.shape
    vis = hidden_states[input_ids == model.config.image_token_id].view(B, num_frames, -1, D)
    g = int(round(vis.shape[2] ** 0.5))
    x = resample_to_teacher_grid(vis.view(B, num_frames, g, g, D), dec.teacher_grid, dec.tubelet)
    preset_cfg = P4D_PRESETS[preset]
    if dec.kind == "mlp":
        loss = fused_linear_latent_loss(dec.hidden(x), dec.fc3.weight, dec.fc3.bias, teacher_latent.to(x.dtype),
                                        kind=preset_cfg.kind)
    else:
        loss = fused_linear_latent_loss(x, dec.layers[-1].weight, dec.layers[-1].bias, teacher_latent.to(x.dtype),
                                        kind=preset_cfg.kind)
    return preset_cfg.latent_weight * loss
