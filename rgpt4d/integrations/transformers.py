"""Drop-in 4D-RGPT parts for a user's own transformers MLLM, using the project's ops.

    from rgpt4d.integrations.transformers import apply_rgpt4d
    apply_rgpt4d(model)                                   # TPE; region tokens with obj_token_ids=[...]
    out = model(input_ids=ids, pixel_values=frames, timestamps=secs)   # one timestamp per frame
    gen = model.generate(input_ids=ids, pixel_values=frames, timestamps=secs, max_new_tokens=4)

The contract, the same for every family (the family adapters in `adapters.py` say where each
model keeps its parts; see docs/integrations.md):

- TPE: `timestamps` (seconds, one per frame, [num_frames] or [B, T], in the order of the frames
  given: each image of `pixel_values` is a frame, then the frames of each video in order) adds
  the paper's sinusoidal encoding (rgpt4d.ops.tpe_add, base 10000) to every feature vector
  entering the projector, D being that tensor's last dimension. A vector made from several frames
  (Qwen's temporal_patch_size) gets the mean of their timestamps. Without `timestamps` the model
  computes exactly what it did before the patch.
- Regions (`obj_token_ids`): `boxes` [B, R, 4] (x0, y0, x1, y1 in the first frame's pixels, as
  given to the model) become region tokens (RegionTokenEncoder: region_pool over every frame's grid
  of the projector input, TPE fused, mean over frames, MLP; trainable parameters
  `rgpt4d_region_encoder`) placed at the `<obj_N>` tokens. The box scale is the grid the
  projector actually receives over the frame's pixels. Regions read the videos when a forward has
  videos, else the images.
- P4D: `attach_p4d` adds the training-only D_4DP (`rgpt4d_p4d`); `p4d_loss` gives the latent
  term, and with `teacher_heads` the explicit terms through those frozen heads; `detach_p4d`
  removes D_4DP. `remove_rgpt4d` undoes everything.
- Kernels: `kernels=True` swaps the language model's layers for rgpt4d ops
  (rgpt4d.integrations.kernels).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Union

import torch
from torch import Tensor, nn

from rgpt4d.integrations.adapters import Adapter, VisualCall, adapter_for
from rgpt4d.integrations.kernels import apply_kernels, remove_kernels
from rgpt4d.models.configs import P4DConfig
from rgpt4d.ops import P4D_PRESETS, P4DLoss, P4DLossOutput, fused_linear_latent_loss, tpe_add

_STATE = "_rgpt4d_state"


class _State:
    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.handles: list = []
        self.orig_forward = None
        self.orig_generate = None
        self.obj_token_ids: list[int] = []
        self.tpe_base = 10000.0
        self.kernels = False
        self.depth = 0  # > 0 inside a patched forward / generate
        # per forward / generate call
        self.timestamps: Tensor | None = None  # [num_frames] float32 seconds
        self.boxes: Tensor | None = None
        self.region_mask: Tensor | None = None
        # per forward
        self.queue: list[VisualCall] = []
        self.current: VisualCall | None = None
        self.main_call: VisualCall | None = None  # the call regions and P4D read
        self.batch = 0
        self.input_ids: Tensor | None = None
        self.region_grid: Tensor | None = None  # [B, T, h, w, C] raw projector input of main_call
        self.region_scale: tuple = (1.0, 1.0)  # grid cells per pixel (x, y)
        # kept after the forward: where the last visual forward put its main call's tokens (P4D)
        self.p4d_layout: tuple | None = None


def _check_timestamps(timestamps) -> Tensor:
    t = torch.as_tensor(timestamps).detach()
    if t.dim() not in (1, 2):
        raise ValueError(f"timestamps: expected [num_frames] or [B, T] seconds, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"timestamps: expected seconds (float), got {t.dtype}")
    t = t.to(torch.float32).reshape(-1)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("timestamps: must be finite seconds")
    return t


def _check_boxes(boxes, region_mask, state: _State) -> tuple[Tensor, Tensor | None]:
    if not state.obj_token_ids:
        raise ValueError("boxes: this model was patched without obj_token_ids (apply_rgpt4d(..., obj_token_ids=[...]))")
    boxes = torch.as_tensor(boxes).detach().to(torch.float32)
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes: expected [B, R, 4] first-frame boxes (x0, y0, x1, y1 pixels), got {tuple(boxes.shape)}")
    if region_mask is not None:
        region_mask = torch.as_tensor(region_mask).bool()
        if tuple(region_mask.shape) != tuple(boxes.shape[:2]):
            raise ValueError(f"region_mask: expected [B, R] = {list(boxes.shape[:2])}, got {tuple(region_mask.shape)}")
    return boxes, region_mask


def _plan(model: nn.Module, state: _State, kwargs: dict) -> None:
    """Lay out this forward's visual calls: which timestamps each consumes, which one regions and
    P4D read; check timestamps and boxes against them."""
    state.input_ids = kwargs.get("input_ids")
    wanted = state.timestamps is not None or state.boxes is not None or hasattr(model, "rgpt4d_p4d")
    calls = state.adapter.plan(model, kwargs) if wanted else []
    if not calls:  # a forward without visual input keeps what the call around it recorded
        if state.depth == 0 and state.boxes is not None:
            raise ValueError("boxes: given without frames (pixel_values / pixel_values_videos) to pool regions from")
        return
    state.current, state.region_grid = None, None
    frames = sum(c.num_frames for c in calls)
    if state.timestamps is not None:
        if state.timestamps.numel() != frames:
            kinds = " + ".join(f"{c.num_frames} {c.kind} frame(s)" for c in calls)
            raise ValueError(f"timestamps: one per frame given; got {state.timestamps.numel()} timestamps for {kinds}")
        off = 0
        for c in calls:
            c.extra["ts"] = state.timestamps[off:off + c.num_frames]
            off += c.num_frames
    main = next((c for c in calls if c.kind == "video"), calls[0])
    ids = state.input_ids
    state.batch = ids.shape[0] if ids is not None else 1
    if state.boxes is not None:
        if ids is None:
            raise ValueError("boxes: region tokens need input_ids (to find the <obj_N> tokens)")
        if state.boxes.shape[0] != state.batch:
            raise ValueError(f"boxes: expected one row per sample, [B={state.batch}, R, 4], got {tuple(state.boxes.shape)}")
        H, W = main.pixels
        b = state.boxes
        ok = (b[..., 0] >= 0) & (b[..., 1] >= 0) & (b[..., 2] <= W) & (b[..., 3] <= H) & (b[..., 2] >= b[..., 0]) \
            & (b[..., 3] >= b[..., 1])
        if state.region_mask is not None:
            ok = ok | ~state.region_mask
        if not bool(ok.all()):
            bad = (~ok).nonzero()[0].tolist()
            raise ValueError(f"boxes: must lie inside the {W}x{H} (width x height) first frame of the {main.kind}s, "
                             f"x0 <= x1, y0 <= y1 (pixels); box {bad} is {b[bad[0], bad[1]].tolist()}")
    if (state.boxes is not None or hasattr(model, "rgpt4d_p4d")) and len(main.region_groups) % state.batch:
        raise ValueError(f"the {main.kind}s give {len(main.region_groups)} frames for {state.batch} samples: "
                         f"regions and P4D need the same number of frames per sample")
    state.queue, state.main_call = list(calls), main


def _call_pre_hook(model: nn.Module, state: _State):
    def hook(module, args, kwargs):
        if state.depth == 0:
            return
        state.current = state.queue.pop(0) if state.queue else None
        if state.current is not None:
            state.adapter.start_call(model, state.current, args, kwargs)
        return
    return hook


def _projector_pre_hook(state: _State):
    def hook(module, args):
        call = state.current
        if call is None:
            return None
        x = args[0]
        if call is state.main_call:
            _record_main(state, call, x)
        ts = call.extra.get("ts")
        if ts is None:
            return None
        tv = call.row_timestamps(ts.to(x.device))
        if tv.numel() != x.shape[0]:
            raise RuntimeError(f"rgpt4d: the projector got {x.shape[0]} rows, the {call.kind} call's layout has "
                               f"{tv.numel()} ({state.adapter.name} adapter)")
        D = x.shape[-1]
        y = tpe_add(x.reshape(1, x.shape[0], -1, D), tv[None], base=state.tpe_base).reshape(x.shape)
        return (y,) + tuple(args[1:])
    return hook


def _record_main(state: _State, call: VisualCall, x: Tensor) -> None:
    """The main call's region grid (the raw projector input; the region encoder adds TPE itself)
    and its token layout in the LM (for P4D)."""
    B = state.batch
    if state.boxes is not None:
        grid = state.adapter.grid(call, x)  # [Gr, h, w, C]
        H, W = call.pixels
        state.region_scale = (grid.shape[2] / W, grid.shape[1] / H)
        state.region_grid = grid.reshape(B, grid.shape[0] // B, *grid.shape[1:])
    state.p4d_layout = None
    if call.lm_grid is None or len(call.region_groups) % B:
        return
    try:
        h, w, per, extra = state.adapter.lm_layout(call, x)
    except ValueError:  # no grid per frame (e.g. a CLS token kept): P4D says so when asked
        return
    state.p4d_layout = (call.token_id, B, len(call.region_groups) // B, h, w, per, extra)


def _language_model_pre_hook(model: nn.Module, state: _State):
    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if state.region_grid is None or embeds is None or state.input_ids is None:
            return None
        ids = state.input_ids
        if embeds.shape[:2] != ids.shape:
            return None
        call, grid = state.main_call, state.region_grid
        B, T = grid.shape[:2]
        ts = call.extra.get("ts")
        # without timestamps the region tokens get the encoding of t = 0 s
        gts = (call.group_timestamps(ts.to(grid.device))[call.region_groups.to(grid.device)].view(B, T)
               if ts is not None else grid.new_zeros(B, T, dtype=torch.float32))
        sx, sy = state.region_scale
        boxes = state.boxes.to(grid.device) * torch.tensor([sx, sy, sx, sy], device=grid.device)
        valid = state.region_mask if state.region_mask is not None else torch.ones(boxes.shape[:2], dtype=torch.bool)
        tokens = model.rgpt4d_region_encoder(grid, boxes.to(grid.dtype), valid.to(grid.device), gts)
        embeds = embeds.clone()
        obj = torch.tensor(state.obj_token_ids, device=ids.device)
        for b in range(B):
            for p in torch.isin(ids[b], obj).nonzero()[:, 0].tolist():
                n = state.obj_token_ids.index(int(ids[b, p]))
                if n >= boxes.shape[1] or not bool(valid[b, n]):
                    raise ValueError(f"input_ids: sample {b} refers to <obj_{n + 1}> but only "
                                     f"{int(valid[b].sum())} region(s) were given in boxes")
                embeds[b, p] = tokens[b, n].to(embeds.dtype)
        kwargs["inputs_embeds"] = embeds
        return args, kwargs
    return hook


def _first_linear(module: nn.Module) -> nn.Linear:
    return next(m for m in module.modules() if isinstance(m, nn.Linear))


def apply_rgpt4d(model: nn.Module, *, tpe: bool = True, tpe_base: float = 10000.0,
                 obj_token_ids: Sequence[int] | None = None, region_hidden_size: int | None = None,
                 kernels: bool = False) -> nn.Module:
    """Patch `model` in place (and return it): `timestamps=` (and `boxes=`, `region_mask=` with
    `obj_token_ids`) on forward and generate; `kernels=True` also swaps the language model's layers
    for rgpt4d ops. A second call raises; `remove_rgpt4d` undoes it. An unsupported model raises
    TypeError naming its class and what the patch needs."""
    if hasattr(model, _STATE):
        raise RuntimeError("apply_rgpt4d: the model is already patched (call remove_rgpt4d first)")
    adapter = adapter_for(model)
    state = _State(adapter)
    state.tpe_base = float(tpe_base)
    projectors = adapter.projectors(model)
    caller = adapter.call_module(model)
    state.handles.append(caller.register_forward_pre_hook(_call_pre_hook(model, state), with_kwargs=True))
    if tpe or obj_token_ids:
        for p in projectors:
            state.handles.append(p.register_forward_pre_hook(_projector_pre_hook(state)))
    if obj_token_ids:
        # start-up: rgpt4d.models.student imports transformers' Qwen2 and SigLIP; only region tokens need it
        from rgpt4d.models.student import RegionTokenEncoder

        text_dim = int(model.get_input_embeddings().embedding_dim)
        state.obj_token_ids = [int(i) for i in obj_token_ids]
        dim = int(_first_linear(projectors[0]).in_features)
        ref = next(projectors[0].parameters())
        # boxes arrive already in grid cells (spatial_scale 1): the scale is the call's own grid / pixels
        model.rgpt4d_region_encoder = RegionTokenEncoder(dim, region_hidden_size or text_dim, text_dim, tpe=True,
                                                         base=tpe_base, spatial_scale=1.0).to(ref.device, ref.dtype)
        state.handles.append(adapter.language_model(model).register_forward_pre_hook(
            _language_model_pre_hook(model, state), with_kwargs=True))

    state.orig_forward = model.forward
    state.orig_generate = getattr(model, "generate", None)

    def _enter(kwargs):
        timestamps = kwargs.pop("timestamps", None)
        boxes = kwargs.pop("boxes", None)
        region_mask = kwargs.pop("region_mask", None)
        if state.depth:
            return
        state.timestamps = _check_timestamps(timestamps) if (timestamps is not None and tpe) else None
        state.boxes, state.region_mask = (_check_boxes(boxes, region_mask, state) if boxes is not None
                                          else (None, None))

    def _run(fn, args, kwargs):
        _enter(kwargs)
        # generate plans the visual calls from its own inputs: transformers 5 encodes the frames
        # before the first forward (get_image_features), 4.x inside it; a forward inside generate
        # plans only when generate's calls are done
        if state.depth == 0 or not state.queue:
            plan_kw = kwargs if not (args and isinstance(args[0], Tensor)) else {**kwargs, "input_ids": args[0]}
            _plan(model, state, plan_kw)
        else:
            state.input_ids = kwargs.get("input_ids", state.input_ids)
        state.depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            state.depth -= 1
            if state.depth == 0:
                state.timestamps = state.boxes = state.region_mask = state.input_ids = state.main_call = None
                state.current, state.queue, state.region_grid = None, [], None

    def forward(self, *args, **kwargs):
        return _run(state.orig_forward, args, kwargs)

    def generate(self, *args, **kwargs):
        return _run(state.orig_generate, args, kwargs)

    # generate() checks its kwargs against forward's signature: keep the original one
    forward.__signature__ = inspect.signature(type(model).forward)
    model.forward = types.MethodType(forward, model)
    if state.orig_generate is not None:
        model.generate = types.MethodType(generate, model)
    object.__setattr__(model, _STATE, state)
    if kernels:
        apply_kernels(model)
        state.kernels = True
    return model


def remove_rgpt4d(model: nn.Module) -> nn.Module:
    """Undo apply_rgpt4d (and attach_p4d): hooks, patched methods, kernel swaps, added modules."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    if state.kernels:
        remove_kernels(model)
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
    """Add the training-only D_4DP as `model.rgpt4d_p4d` (the paper's MLP by default; a
    rgpt4d.models.configs.P4DConfig picks the kind). teacher_grid (T', h, w): the teacher latent's
    grid; the LM's visual hidden states are taken every `tubelet`-th frame and resized to it."""
    from rgpt4d.models.p4d import P4DDecoder  # start-up: rgpt4d.models.p4d imports the student and teacher

    if not hasattr(model, _STATE):
        raise RuntimeError("attach_p4d: patch the model first (apply_rgpt4d)")
    text_dim = int(model.get_input_embeddings().embedding_dim)
    cfg = config or P4DConfig(hidden_size=2 * text_dim)
    ref = model.get_input_embeddings().weight
    model.rgpt4d_p4d = P4DDecoder(text_dim, int(teacher_dim), cfg).to(ref.device, ref.dtype)
    model.rgpt4d_p4d.teacher_grid, model.rgpt4d_p4d.tubelet = tuple(teacher_grid), int(tubelet)
    return model


def detach_p4d(model: nn.Module) -> nn.Module:
    """Remove D_4DP: the model is the plain MLLM again (same parameters as before attach_p4d)."""
    if hasattr(model, "rgpt4d_p4d"):
        del model.rgpt4d_p4d
    return model


def visual_hidden(model: nn.Module, hidden_states: Tensor, input_ids: Tensor) -> Tensor:
    """The LM hidden states [B, L, D] at the visual tokens of the last forward's video (else
    images), as a grid [B, T, h, w, D] (T: the LM's frames, after any temporal merge)."""
    state = getattr(model, _STATE, None)
    layout = state.p4d_layout if state is not None else None
    if layout is None:
        raise RuntimeError("P4D: no visual layout recorded: run the patched model's forward with visual input after "
                           "attach_p4d (any-resolution images with several crops have no grid layout: use videos)")
    token_id, B, T, h, w, per, extra = layout
    if hidden_states.shape[0] != B or input_ids.shape[0] != B:
        raise ValueError(f"hidden_states/input_ids: the last forward had {B} samples, got {hidden_states.shape[0]} "
                         f"and {input_ids.shape[0]}")
    D = hidden_states.shape[-1]
    mask = input_ids == token_id
    counts = mask.sum(1)
    need = T * per + extra
    if not bool((counts == need).all()):
        raise ValueError(f"input_ids: expected {need} visual tokens (id {token_id}) per sample, got {counts.tolist()}")
    vis = hidden_states[mask].view(B, need, D)[:, :T * per].view(B, T, per, D)[:, :, :h * w]
    return vis.reshape(B, T, h, w, D)


HeadsArg = Union[None, Callable[[list], Mapping[str, Tensor]], Mapping[str, Callable[[list], Tensor]]]


def p4d_loss(model: nn.Module, hidden_states: Tensor, input_ids: Tensor, teacher_targets: Mapping[str, Tensor], *,
             teacher_heads: HeadsArg = None, preset: str = "paper"):
    """The P4D loss of the last forward: D_4DP on the LM's last hidden states [B, L, D] at the
    visual tokens, against the teacher's targets.

    teacher_targets: "latent" [B, T', h, w, C_t] (the "linear" D_4DP: "layers" [B, 4, T', h, w, C_t]),
    and for the explicit terms one target per head name. teacher_heads: the frozen teacher heads,
    either a callable taking the decoded grids (a list of four [B, T', h, w, C_t]) and returning
    {name: prediction}, e.g. rgpt4d's Teacher4D.predict_heads, or a mapping {name: head} of
    modules taking that list. None: the latent term only (D_4DP's last Linear fused with the loss).

    Returns rgpt4d.ops.P4DLossOutput(total, terms): total = alpha * L_LD (+ beta * sum lambda_m L_m)
    with the preset's weights; terms are the unweighted losses by name.
    """
    from rgpt4d.models.p4d import resample_to_teacher_grid  # start-up: as in attach_p4d

    dec = getattr(model, "rgpt4d_p4d", None)
    if dec is None:
        raise RuntimeError("p4d_loss: no D_4DP attached (call attach_p4d first)")
    x = resample_to_teacher_grid(visual_hidden(model, hidden_states, input_ids), dec.teacher_grid, dec.tubelet)
    pc = P4D_PRESETS[preset]
    key = "latent" if dec.kind == "mlp" else "layers"
    if key not in teacher_targets:
        raise ValueError(f"teacher_targets: needs {key!r} for the {dec.kind} D_4DP")
    target = teacher_targets[key].to(x.dtype)
    if teacher_heads is None:
        if dec.kind == "mlp":
            ld = fused_linear_latent_loss(dec.hidden(x), dec.fc3.weight, dec.fc3.bias, target, kind=pc.kind)
        else:
            ld = sum(fused_linear_latent_loss(x, lin.weight, lin.bias, target[:, i], kind=pc.kind)
                     for i, lin in enumerate(dec.layers)) / len(dec.layers)
        return P4DLossOutput(pc.latent_weight * ld, {"latent": ld})
    grids = dec(x)
    if isinstance(teacher_heads, Mapping):
        preds = {name: head(grids) for name, head in teacher_heads.items()}
    else:
        preds = dict(teacher_heads(grids))
    missing = [k for k in preds if k not in teacher_targets]
    if missing:
        raise ValueError(f"teacher_targets: no target for the head(s) {missing}")
    tgts = {k: teacher_targets[k].to(x.dtype) for k in preds}
    lat_pred = grids[-1] if dec.kind == "mlp" else torch.stack(grids, 1)
    return P4DLoss(preset)(lat_pred, target, preds, tgts)
