"""Where each transformers MLLM family keeps what the rgpt4d contract needs.

One adapter per family says: which module is the projector (TPE is added to its input), which
module starts a visual call (its pre-hook sees the call's layout), which frames the rows of the
projector input come from, the grid those rows form (for region tokens), and where the language
model and its visual placeholder tokens are (for region tokens and P4D). Everything else — the
hooks, timestamps, boxes, P4D — is the family-independent contract in `transformers.py`.

Adding a family is adding an `Adapter` subclass here, listing it in `ADAPTERS`, and a tiny-config
test. Attribute and class names are looked up under both transformers layouts: 4.x keeps the
towers and the language model on the top-level model (`model.multi_modal_projector`,
`model.visual`), 5.x under `model.model`.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class VisualCall:
    """One pass of frames through the vision tower and projector (the images, or the videos, of a
    forward). Rows are the projector input's leading dimension (a crop's tokens for the LLaVA
    family, one patch vector for the Qwen-VL family)."""

    kind: str                  # "image" | "video"
    num_frames: int            # timestamps it consumes, in the order of the user's frames
    group_frames: Tensor       # [G, k] long: the frames (call-local) each group of rows comes from
    rows_per_group: Tensor     # [G] long: projector-input rows of each group
    pixels: tuple              # (H, W) pixels of one frame as given to the model
    token_id: int              # the placeholder id of this call's tokens in input_ids
    region_groups: Tensor      # [Gr] long: the groups a frame's region grid is read from
    lm_grid: tuple | None = None  # (h, w, tokens per group, extra tokens per sample) in the LM; None: no P4D
    extra: dict = field(default_factory=dict)  # adapter-private (grid_thw, window order)

    def row_timestamps(self, ts: Tensor) -> Tensor:
        """[R] seconds of each projector-input row: the mean of its group's frames."""
        return ts[self.group_frames].mean(-1).repeat_interleave(self.rows_per_group.to(ts.device))

    def group_timestamps(self, ts: Tensor) -> Tensor:
        return ts[self.group_frames].mean(-1)


def _find(model: nn.Module, *names: str) -> nn.Module | None:
    """The first of `names` on model or model.model (transformers 4.x / 5.x layouts)."""
    for owner in (model, getattr(model, "model", None)):
        for name in names:
            m = getattr(owner, name, None) if owner is not None else None
            if isinstance(m, nn.Module):
                return m
    return None


def _as_int(v) -> int:
    """A config size that may be an int or a per-axis pair (InternVL's image_size/patch_size)."""
    if isinstance(v, (list, tuple)):
        if len(set(int(x) for x in v)) != 1:
            raise ValueError(f"a square vision grid is expected, got the size {list(v)}")
        return int(v[0])
    return int(v)


def _token_id(config, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return int(v)
    return None


def _isqrt(n: int, what: str) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{what}: a square grid of tokens per frame is expected, got {n} tokens")
    return g


class Adapter:
    """Base: a LLaVA-style model (vision tower -> `multi_modal_projector` -> language model, one
    projector row per image, square grids)."""

    name = "llava"
    classes: tuple = ("LlavaForConditionalGeneration",)
    needs = ("a `multi_modal_projector` module", "a `vision_tower` module", "a `language_model` module",
             "config.image_token_index or config.image_token_id")

    # -- structure ------------------------------------------------------------------------------
    def missing(self, model: nn.Module) -> list[str]:
        """What of `needs` the model lacks (empty: the adapter applies)."""
        out = []
        if _find(model, "multi_modal_projector") is None:
            out.append(self.needs[0])
        if _find(model, "vision_tower") is None:
            out.append(self.needs[1])
        if _find(model, "language_model") is None:
            out.append(self.needs[2])
        if _token_id(model.config, "image_token_index", "image_token_id") is None:
            out.append(self.needs[3])
        return out

    def projectors(self, model: nn.Module) -> list[nn.Module]:
        return [_find(model, "multi_modal_projector")]

    def call_module(self, model: nn.Module) -> nn.Module:
        """The module whose forward starts one visual call (its pre-hook takes the next call)."""
        return self.projectors(model)[0]

    def language_model(self, model: nn.Module) -> nn.Module:
        return _find(model, "language_model")

    def start_call(self, model: nn.Module, call: VisualCall, args: tuple, kwargs: dict) -> None:
        """At the call module's pre-hook, before the projector sees the call's rows."""

    # -- calls ------------------------------------------------------------------------------------
    def plan(self, model: nn.Module, kwargs: dict) -> list[VisualCall]:
        """The visual calls a forward with these inputs makes, in order (images before videos)."""
        pv = kwargs.get("pixel_values")
        if pv is None:
            return []
        if pv.dim() != 4:
            raise ValueError(f"pixel_values: expected [num_images, 3, H, W], got shape {tuple(pv.shape)}")
        image_id = _token_id(model.config, "image_token_index", "image_token_id")
        return [self._frames_call("image", pv.shape[0], pv.shape[-2:], image_id, (None, None, 0))]

    @staticmethod
    def _frames_call(kind, n, pixels, token_id, lm, crops: Tensor | None = None) -> VisualCall:
        """n frames; each frame `crops[i]` rows (1 by default), its first row its full-frame grid."""
        crops = torch.ones(n, dtype=torch.long) if crops is None else crops
        first = torch.cat([crops.new_zeros(1), crops.cumsum(0)[:-1]])
        groups = torch.arange(n).repeat_interleave(crops)
        # one group per row: the row's frame; the region grid reads each frame's first row
        return VisualCall(kind, n, groups[:, None], torch.ones_like(groups), tuple(int(s) for s in pixels),
                          token_id, first, lm_grid=lm)

    def grid(self, call: VisualCall, x: Tensor) -> Tensor:
        """The region grid [Gr, h, w, C] of the projector input x (rows of square grids)."""
        rows = x[call.region_groups.to(x.device)]
        g = _isqrt(rows.shape[1], "region tokens")
        return rows.reshape(rows.shape[0], g, g, rows.shape[-1])

    def lm_layout(self, call: VisualCall, x: Tensor) -> tuple:
        """(h, w, tokens per group, extra tokens per sample) of this call's tokens in the LM."""
        h, w, extra = call.lm_grid
        if h is None:  # the LM sees the projector's grid as it is
            g = _isqrt(x.shape[1], "P4D")
            return g, g, g * g, extra
        return h, w, h * w, extra


class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT-Video and LLaVA-OneVision: images are any-resolution crops (the first crop the
    whole image); videos `pixel_values_videos` [B, F, 3, H, W] one row per frame, NeXT-Video pooling
    the grid (vision_resampler) before the projector, OneVision pooling after it."""

    name = "llava_next"
    classes = ("LlavaNextVideoForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
               "LlavaNextForConditionalGeneration")

    def _num_crops(self, model, pv: Tensor, image_sizes, batch_num_images) -> Tensor:
        """Crops per image, as the model computes them (image_size_to_num_patches)."""
        if pv.dim() == 4 and image_sizes is None:
            return torch.ones(pv.shape[0], dtype=torch.long)
        mod = importlib.import_module(type(model).__module__)
        to_num = mod.image_size_to_num_patches
        need = [True] * len(image_sizes) if batch_num_images is None else [
            int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        cfg = model.config
        return torch.tensor([to_num(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                    patch_size=cfg.vision_config.image_size) if p else 1
                             for s, p in zip(image_sizes, need)], dtype=torch.long)

    def plan(self, model, kwargs):
        calls = []
        cfg = model.config
        pv = kwargs.get("pixel_values")
        if pv is not None:
            crops = self._num_crops(model, pv, kwargs.get("image_sizes"), kwargs.get("batch_num_images"))
            image_id = _token_id(cfg, "image_token_index", "image_token_id")
            # P4D on images only where each image is one crop (its tokens: the grid, then a newline)
            lm = (None, None, 0) if bool((crops == 1).all()) else None
            call = self._frames_call("image", len(crops), pv.shape[-2:], image_id, lm, crops)
            call.extra["newline"] = "OnevisionForConditional" in type(model).__name__
            calls.append(call)
        pvv = kwargs.get("pixel_values_videos")
        if pvv is not None:
            if pvv.dim() != 5:
                raise ValueError(f"pixel_values_videos: expected [B, F, 3, H, W], got shape {tuple(pvv.shape)}")
            video_id = _token_id(cfg, "video_token_index", "video_token_id")
            if "Onevision" in type(model).__name__:  # pooled to ceil(g/2) after the projector; one newline per video
                g = _as_int(cfg.vision_config.image_size) // _as_int(cfg.vision_config.patch_size)
                lm = (-(-g // 2), -(-g // 2), 1)
            else:
                lm = (None, None, 0)
            calls.append(self._frames_call("video", pvv.shape[0] * pvv.shape[1], pvv.shape[-2:], video_id, lm))
        return calls

    def lm_layout(self, call, x):
        h, w, per, extra = super().lm_layout(call, x)
        if call.extra.get("newline"):  # OneVision: a newline token after each single-crop image
            per += 1
        return h, w, per, extra


class InternVLAdapter(Adapter):
    """InternVL: each entry of `pixel_values` is a frame (a tile); the projector input is the
    pixel-shuffled grid (g/2 x g/2 tokens of 4x the vision width)."""

    name = "internvl"
    classes = ("InternVLForConditionalGeneration",)


class QwenVLAdapter(Adapter):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the projector is the vision tower's `merger`; its input is
    one row per patch, in merge-window order ([t, h/m, w/m, m, m] per image or video, Qwen2.5-VL
    reordering the windows), `temporal_patch_size` frames merged into each t. The visual call
    starts at the vision tower (`visual`), whose `grid_thw` argument it reads."""

    name = "qwen_vl"
    classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
               "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    needs = ("a vision tower `visual` with a `merger` projector", "a language model",
             "config.image_token_id and config.video_token_id")

    def missing(self, model):
        out = []
        visual = _find(model, "visual")
        if visual is None or not isinstance(getattr(visual, "merger", None), nn.Module):
            out.append(self.needs[0])
        if self.language_model(model) is None:
            out.append(self.needs[1])
        if _token_id(model.config, "image_token_id") is None or _token_id(model.config, "video_token_id") is None:
            out.append(self.needs[2])
        return out

    def projectors(self, model):
        return [_find(model, "visual").merger]

    def call_module(self, model):
        return _find(model, "visual")

    def language_model(self, model):
        lm = _find(model, "language_model")
        if lm is None:  # transformers 4.x: model.model is the text model itself
            inner = getattr(model, "model", None)
            lm = inner if inner is not None and hasattr(inner, "embed_tokens") else None
        return lm

    def plan(self, model, kwargs):
        vc = model.config.vision_config
        m, p = int(vc.spatial_merge_size), _as_int(vc.patch_size)
        tps = _as_int(vc.temporal_patch_size)
        calls = []
        for kind, pv_key, thw_key, tok in (("image", "pixel_values", "image_grid_thw", "image_token_id"),
                                           ("video", "pixel_values_videos", "video_grid_thw", "video_token_id")):
            if kwargs.get(pv_key) is None:
                continue
            thw = kwargs.get(thw_key)
            if thw is None:
                raise ValueError(f"{thw_key}: needed with {pv_key} (the [t, h, w] patch grid of each {kind})")
            thw = torch.as_tensor(thw).long().cpu().reshape(-1, 3)
            # TPE works per entry at any resolutions; region grids and P4D stack the frames
            same = len(set(map(tuple, thw[:, 1:].tolist()))) == 1
            group_frames, rows, nf = [], [], 0
            for t, h, w in thw.tolist():
                # an image is one frame (duplicated by the processor over temporal_patch_size);
                # a video of t groups has t * temporal_patch_size frames
                k = tps
                if kind == "image":
                    group_frames.append(torch.full((1, k), nf))
                    nf += 1
                else:
                    group_frames.append(nf + torch.arange(t * k).view(t, k))
                    nf += t * k
                rows += [h * w] * t
            h, w = thw[0, 1:].tolist()
            call = VisualCall(kind, nf, torch.cat(group_frames), torch.tensor(rows), (h * p, w * p),
                              _token_id(model.config, tok), torch.arange(len(rows)),
                              lm_grid=(h // m, w // m, 0) if same else None)
            call.extra.update(thw=thw, same=same, merge=m)
            calls.append(call)
        return calls

    def grid(self, call, x):
        """[G, h/m, w/m, m*m*D]: each merge window's m x m patch vectors concatenated (what the
        merger's MLP sees), windows in raster order."""
        if not call.extra["same"]:
            raise ValueError("boxes: region tokens need every image/video of the call at one resolution")
        m = call.extra["merge"]
        order = call.extra.get("window_order")
        D = x.shape[-1]
        units = x.reshape(-1, m * m * D)
        if order is not None:  # Qwen2.5-VL: undo the window reordering
            units = units[torch.argsort(order.to(x.device))]
        h, w = (s // m for s in call.extra["thw"][0, 1:].tolist())
        return units.reshape(-1, h, w, m * m * D)

    def lm_layout(self, call, x):
        if call.lm_grid is None:
            raise ValueError("P4D: needs every image/video of the call at one resolution")
        h, w, extra = call.lm_grid
        return h, w, h * w, extra

    def start_call(self, model, call: VisualCall, args, kwargs) -> None:
        """At the vision tower's pre-hook: check the call is the planned one and record Qwen2.5-VL's
        window order."""
        thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if thw is not None and not torch.equal(torch.as_tensor(thw).long().cpu().reshape(-1, 3), call.extra["thw"]):
            raise RuntimeError(f"rgpt4d: the vision tower was called with grid_thw {thw.tolist()}, the planned "
                               f"{call.kind} call has {call.extra['thw'].tolist()}")
        visual = _find(model, "visual")
        if getattr(visual, "window_size", None) is not None and hasattr(visual, "fullatt_block_indexes"):
            call.extra["window_order"] = _window_index(visual, call.extra["thw"])


def _window_index(visual: nn.Module, thw: Tensor) -> Tensor:
    """Qwen2.5-VL's merge-unit order inside its vision tower (transformers 4.x: a method; 5.x: a
    function in transformers.vision_utils)."""
    if hasattr(visual, "get_window_index"):
        return visual.get_window_index(thw)[0]
    from transformers.vision_utils import get_vision_window_index  # optional: transformers 5.x only

    return get_vision_window_index(thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                                   patch_size=visual.patch_size)[0]


ADAPTERS = (QwenVLAdapter(), InternVLAdapter(), LlavaNextAdapter(), Adapter())


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of the model's family (by class), else the first whose needs the model meets;
    an unsupported model gets an error naming its class and what it lacks."""
    names = [c.__name__ for c in type(model).__mro__]
    for a in ADAPTERS:
        if any(n in a.classes for n in names):
            lacks = a.missing(model)
            if lacks:
                raise TypeError(f"apply_rgpt4d: {type(model).__name__} lacks {', '.join(lacks)} (the {a.name} "
                                f"adapter needs them)")
            return a
    report: dict = {}
    for a in ADAPTERS:
        lacks = a.missing(model)
        if not lacks:
            return a
        report.setdefault(", ".join(lacks), []).append(a.name)
    lacking = "; ".join(f"as {'/'.join(names)} it lacks {lacks}" for lacks, names in
                        sorted(report.items(), key=lambda kv: "qwen_vl" in kv[1]))
    supported = ", ".join(c for a in ADAPTERS for c in a.classes)
    raise TypeError(f"apply_rgpt4d: {type(model).__name__} is not supported: the patch needs a projector that maps "
                    f"vision features into the language model; {lacking}. Supported: {supported} and LLaVA-style "
                    f"models")
