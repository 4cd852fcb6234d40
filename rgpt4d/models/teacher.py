"""The frozen 4D teacher (L4P-like): a VideoMAE encoder (tubelet 2) with DPT-like heads.

    frames [B, T, 3, H, W] --VideoMAE--> tokens of layers l1..l4, each a grid [B, T/2, h, w, C_t]
    heads (each reads the four layers, fuses them coarse-to-fine, upsamples to pixels, and unfolds
    the tubelet back into frames):
        depth  [B, T, H, W]    1 channel, exp activation (metres)
        flow   [B, T, 2, H, W] backward optical flow (pixels of the teacher's input)
        motion [B, T, H, W]    logits of "this pixel moved since the previous frame"
        camray [B, T, 6, H, W] Plücker rays (unit direction, moment) in the first frame's camera

`latent()` is the grid of the last head layer, [B, T/2, h, w, C_t]: F_4D of the paper. The
student's P4D decoder predicts it (and, for the released code's variant, all four head layers);
explicit predictions pass the predicted grids through these same heads, frozen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import parse_qsl, urlencode

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import VideoMAEConfig, VideoMAEModel
from transformers.models.videomae import modeling_videomae as mv

from rgpt4d.models.attention import attention_function
from rgpt4d.models.configs import TeacherConfig
from rgpt4d.models.frames import normalize_frames
from rgpt4d.models.l4p import IMAGENET_MEAN, IMAGENET_STD, read_l4p
from rgpt4d.ops import pixel_shuffle_act

def _box_mean(t: Tensor, k: int) -> Tensor:
    """Mean over the k x k window around each pixel (k odd; only the pixels inside the image count),
    as differences of running sums: O(1) per pixel (CPU avg_pool2d with a 9x9 window costs as much as
    a quarter of a teacher training step)."""
    r = k // 2
    for dim in (-1, -2):
        n = t.shape[dim]
        pad = (r + 1, r) if dim == -1 else (0, 0, r + 1, r)
        c = F.pad(t, pad).cumsum(dim)
        t = c.narrow(dim, k, n) - c.narrow(dim, 0, n)
        idx = torch.arange(n, device=t.device)
        count = ((idx + r).clamp(max=n - 1) - (idx - r).clamp(min=0) + 1).to(t.dtype)
        t = t / (count if dim == -1 else count[:, None])
    return t


def flow_cue(x: Tensor, window: int = 9, max_flow: float = 8.0) -> Tensor:
    """Lucas-Kanade estimate of the backward flow of each frame, [B, T, 2, S, S] in pixels (frame 0: zero).

    x: normalised frames [B, T, C, S, S]. Brightness constancy, I_t(p) = I_{t-1}(p + u), linearised
    (I_t - I_{t-1} = grad I . u), solved by least squares over a `window` x `window` box around every
    pixel and over the colour channels (u = adj(M) b / det(M), M the windowed structure tensor), with
    a damping term added to det(M) (1e-3 of the squared mean gradient energy of the frame) that pulls
    textureless windows towards zero; clamped to +-max_flow. It is a rough,
    direction-right estimate (cosine ~0.7 with the synthetic ground truth, magnitudes too small
    beyond ~1 px) that the encoder refines; its value is that it is a first-order input the heads
    can learn from at once.
    """
    B, T = x.shape[:2]
    x = x.float()
    prev = torch.cat([x[:, :1], x[:, :-1]], 1)
    avg, dt = (0.5 * (prev + x)).flatten(0, 1), (x - prev).flatten(0, 1)
    dx, dy = torch.zeros_like(avg), torch.zeros_like(avg)
    dx[..., 1:-1] = 0.5 * (avg[..., 2:] - avg[..., :-2])
    dy[..., 1:-1, :] = 0.5 * (avg[..., 2:, :] - avg[..., :-2, :])
    terms = torch.stack([dx * dx, dy * dy, dx * dy, dx * dt, dy * dt], 1).sum(2)  # [B*T, 5, S, S]
    a11, a22, a12, b1, b2 = _box_mean(terms, window).unbind(1)
    ridge = 1e-3 * (a11 + a22).mean((-1, -2), keepdim=True) ** 2 + 1e-12
    det = a11 * a22 - a12 * a12 + ridge
    u = torch.stack([a22 * b1 - a12 * b2, a11 * b2 - a12 * b1], 1) / det[:, None]
    return u.clamp(-max_flow, max_flow).unflatten(0, (B, T))


class _ResidualConvUnit(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class DPTHead(nn.Module):
    """A DPT-like dense head over four token grids.

    Reassemble: each layer's tokens -> Linear to `features` -> a map at the token grid, resampled to
    the pyramid `scales` (multiples of the grid, finest first). Fuse: from the coarsest map up, each
    step adds the next map and refines it with a residual conv unit. Output: a conv at the finest
    map, then a learned pixel shuffle to the pixel grid (`patch_size / scales[0]` pixels per side:
    no convolution runs at full resolution, which is what makes the heads cheap enough to train and
    to run inside P4D on a CPU), `out_channels * tubelet` channels unfolded into the tubelet's frames.
    """

    def __init__(self, in_dim: int, features: int, out_channels: int, patch_size: int, tubelet: int,
                 activation: str = "none", scales: Sequence[float] = (2.0, 1.0, 0.5, 0.25)):
        super().__init__()
        self.out_channels, self.patch_size, self.tubelet, self.activation = out_channels, patch_size, tubelet, activation
        self.scales = tuple(float(s) for s in scales)
        self.upscale = int(round(patch_size / self.scales[0]))
        if len(self.scales) != 4 or self.upscale < 1 or abs(patch_size / self.scales[0] - self.upscale) > 1e-6:
            raise ValueError(f"DPTHead: scales must be four, the first dividing patch_size {patch_size} into whole "
                             f"pixels, got {scales}")
        self.project = nn.ModuleList(nn.Linear(in_dim, features) for _ in range(4))
        self.refine = nn.ModuleList(_ResidualConvUnit(features) for _ in range(4))
        self.out = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1), nn.ReLU(),
            nn.Conv2d(features, out_channels * tubelet * self.upscale ** 2, 1),
        )

    def forward(self, layers: Sequence[Tensor]) -> Tensor:
        """layers: four grids [B, T', h, w, C] -> [B, T' * tubelet, out_channels, h*patch, w*patch]."""
        if len(layers) != 4:
            raise ValueError(f"DPTHead: expected four layer grids, got {len(layers)}")
        B, Tp, h, w, _ = layers[0].shape
        maps = [self._at_scale(proj(grid).flatten(0, 1).permute(0, 3, 1, 2), scale, h, w)  # [B*T', F, h', w']
                for proj, scale, grid in zip(self.project, self.scales, layers)]
        x = self.refine[3](maps[3])
        for i in (2, 1, 0):
            x = F.interpolate(x, size=maps[i].shape[-2:], mode="bilinear", align_corners=False)
            x = self.refine[i](x + maps[i])
        return self._to_pixels(self.out(x), B, Tp, h, w)

    @staticmethod
    def _at_scale(m: Tensor, scale: float, h: int, w: int) -> Tensor:
        """A reassembled map [N, F, h, w] resampled to `scale` times the token grid."""
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        return m if size == (h, w) else F.interpolate(m, size=size, mode="bilinear", align_corners=False)

    def _to_pixels(self, x: Tensor, B: int, Tp: int, h: int, w: int) -> Tensor:
        """The last conv's output [B*T', C*tubelet*up^2, h', w'] -> [B, T'*tubelet, C, h*patch, w*patch]."""
        size = (h * self.patch_size, w * self.patch_size)
        if (x.shape[-2] * self.upscale, x.shape[-1] * self.upscale) == size:
            # pixel shuffle + activation in one op (rgpt4d.ops; backend eager: F.pixel_shuffle, torch.exp(clamp))
            x = pixel_shuffle_act(x, self.upscale, "exp" if self.activation == "exp" else "none", 20.0)
        else:
            x = F.pixel_shuffle(x, self.upscale)  # [B*T', C*tubelet, h'*up, w'*up]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            if self.activation == "exp":
                x = torch.exp(x.clamp(max=20.0))
        H, W = x.shape[-2:]
        return x.reshape(B, Tp, self.tubelet, self.out_channels, H, W).flatten(1, 2)


def same_structure(heads: Sequence[DPTHead]) -> bool:
    """Whether `dpt_heads_fused` can run these heads together (same features, scales, input width,
    dtype and device)."""
    if not heads or not all(isinstance(h, DPTHead) for h in heads):
        return False
    a = heads[0]
    w0 = a.project[0].weight
    return all(isinstance(h, DPTHead) and h.scales == a.scales
               and h.project[0].weight.shape == w0.shape and h.project[0].weight.dtype == w0.dtype
               and h.project[0].weight.device == w0.device
               and h.refine[0].conv1.weight.shape == a.refine[0].conv1.weight.shape for h in heads)


def dpt_heads_fused(heads: Sequence[DPTHead], layers: Sequence[Tensor],
                    cache: Optional[dict] = None) -> list[Tensor]:
    """Several DPT heads on the same four layer grids in one pass: `[head(layers) for head in heads]`,
    horizontally fused. The heads' projections of a layer become one Linear, every resample runs
    once over all heads' channels, and the refine convolutions of the three coarse levels are
    grouped convolutions (a group per head); the finest level (its refine unit, the output
    convolutions, the pixel shuffle) runs per head. Same arithmetic as the per-head loop in fewer
    calls (three heads: 4 Linears instead of 12, 18 convolutions instead of 30, 6 resamples instead
    of 18), with every convolution weight kept channels-last like the maps (oneDNN would otherwise
    reorder a contiguous weight on every call).
    Effect on a training step: `python benchmarks/bench_e2e.py` (its eager provider runs the loop;
    benchmarks/results/cpu-2cores/README.md).

    cache: a dict the packed (concatenated) weights are kept in, reused while no head parameter
    changed (keyed by parameter, storage and version counter: load_state_dict, in-place updates
    under no_grad, .to() and replaced parameters all repack; writes through `.data` bypass the
    version counter and are not seen); only used when no head parameter requires grad. With
    trainable heads the packing is part of the graph, so the weights get their gradients."""
    heads = list(heads)
    if len(layers) != 4:
        raise ValueError(f"dpt_heads_fused: expected four layer grids, got {len(layers)}")
    if not heads:
        raise ValueError("dpt_heads_fused: no heads")
    params = [p for h in heads for p in _head_params(h)]
    frozen = not any(p.requires_grad for p in params)
    # (a new dtype or device is a new storage; the old one is pinned below, so its address is not reused)
    key = (tuple(map(id, params)), tuple(p.data_ptr() for p in params), tuple(p._version for p in params)) \
        if frozen else None
    if cache is None or key is None or cache.get("key") != key:
        # (checked when packing: a cache hit means the same parameters, so the same shapes)
        if not same_structure(heads):
            raise ValueError("dpt_heads_fused: the heads must share features, scales, input width, dtype "
                             "and device")
        packed = _pack_heads(heads)
        if cache is not None and key is not None:
            cache.clear()
            cache.update(key=key, packed=packed, pinned=[p.detach() for p in params])
    else:
        packed = cache["packed"]
    G, lead = len(heads), heads[0]
    B, Tp, h, w, _ = layers[0].shape
    maps = [lead._at_scale(F.linear(grid, *wb).flatten(0, 1).permute(0, 3, 1, 2), scale, h, w)
            for grid, wb, scale in zip(layers, packed["project"], lead.scales)]  # [B*T', G*F, h', w']

    def conv(x, wb, groups=1):
        return F.conv2d(x, wb[0], wb[1], padding=wb[0].shape[-1] // 2, groups=groups)

    def refine(x, c1, c2, groups=1):  # _ResidualConvUnit
        return x + conv(F.relu(conv(F.relu(x), c1, groups)), c2, groups)

    x = None
    for i in (3, 2, 1):  # the coarse levels as DPTHead.forward, a group per head
        x = maps[i] if x is None else F.interpolate(x, size=maps[i].shape[-2:], mode="bilinear",
                                                    align_corners=False) + maps[i]
        x = refine(x, *packed["refine"][i], groups=G)
    # The finest level per head: its convolutions are compute-bound, and there oneDNN's grouped
    # kernel is slower than one plain convolution per head (8-10 % at batch 8 on a 2-core CPU,
    # `python benchmarks/bench_e2e.py --batch 8`).
    x = F.interpolate(x, size=maps[0].shape[-2:], mode="bilinear", align_corners=False)
    outs = []
    for head, a, b, (c1, c2, o0, o2) in zip(heads, x.chunk(G, 1), maps[0].chunk(G, 1), packed["fine"]):
        y = conv(F.relu(conv(refine(a + b, c1, c2), o0)), o2)  # head.refine[0], then head.out
        outs.append(head._to_pixels(y, B, Tp, h, w))
    return outs


def _head_params(h: DPTHead) -> list[Tensor]:
    """The parameters dpt_heads_fused packs, in a fixed order (attribute reads: Module.parameters()
    costs ~0.1 ms per call for three heads)."""
    mods = [*h.project, *(c for u in h.refine for c in (u.conv1, u.conv2)), h.out[0], h.out[2]]
    return [t for m in mods for t in (m.weight, m.bias)]


def _pack_heads(heads: Sequence[DPTHead]) -> dict:
    """The heads' weights concatenated head after head (the channel order of the fused maps),
    convolution weights channels-last."""
    def cat(mods, conv=False):
        w = torch.cat([m.weight for m in mods])
        b = torch.cat([m.bias for m in mods])
        return (w.contiguous(memory_format=torch.channels_last) if conv else w), b

    def cl(m):
        return m.weight.contiguous(memory_format=torch.channels_last), m.bias

    return {
        "project": [cat([h.project[i] for h in heads]) for i in range(4)],
        "refine": [None] + [(cat([h.refine[i].conv1 for h in heads], True),
                             cat([h.refine[i].conv2 for h in heads], True)) for i in range(1, 4)],
        # level 0 runs per head
        "fine": [tuple(cl(m) for m in (h.refine[0].conv1, h.refine[0].conv2, h.out[0], h.out[2]))
                 for h in heads],
    }


HEAD_SPECS = {"depth": (1, "exp"), "flow": (2, "none"), "motion": (1, "none"), "camray": (6, "none")}


@dataclass
class TeacherOutput:
    latent: Tensor  # [B, T', h, w, C_t]
    layers: list  # four [B, T', h, w, C_t]
    depth: Optional[Tensor] = None  # [B, T, H, W] metres
    flow: Optional[Tensor] = None  # [B, T, 2, H, W] pixels
    motion: Optional[Tensor] = None  # [B, T, H, W] logits
    camray: Optional[Tensor] = None  # [B, T, 6, H, W] Plücker rays (direction, moment), first frame's camera (L4P: one per patch)


class VideoMAESelfAttentionOps(mv.VideoMAESelfAttention):
    """VideoMAESelfAttention whose "sdpa" attention goes through rgpt4d.ops.attention
    (rgpt4d.models.attention.sdpa_attention); projections and parameters are the module's own,
    backend eager is transformers' sdpa path."""

    def forward(self, hidden_states: Tensor):
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        fn = attention_function(self, mv.eager_attention_forward)
        ctx, probs = fn(self, q, k, v, None, is_causal=self.is_causal, scaling=self.scaling,
                        dropout=0.0 if not self.training else self.dropout_prob)
        return ctx.reshape(*ctx.shape[:-2], self.all_head_size), probs


def use_rgpt4d_encoder_ops(encoder: nn.Module) -> nn.Module:
    """Route a VideoMAE encoder's attention through rgpt4d.ops.attention, in place (state dict unchanged)."""
    for module in encoder.modules():
        if type(module) is mv.VideoMAESelfAttention:
            module.__class__ = VideoMAESelfAttentionOps
    return encoder


class Teacher4D(nn.Module):
    """L4P-like teacher. Train it with `train_teacher`, then it is frozen (`freeze()`)."""

    def __init__(self, config: TeacherConfig):
        super().__init__()
        self.config = config
        self.encoder = use_rgpt4d_encoder_ops(VideoMAEModel(VideoMAEConfig(**config.videomae_kwargs())))
        self.heads = nn.ModuleDict({
            name: DPTHead(config.hidden_size, config.head_features, HEAD_SPECS[name][0], config.patch_size,
                          config.tubelet_size, HEAD_SPECS[name][1], config.head_scales)
            for name in config.heads
        })

    # -- encoder -------------------------------------------------------------------------------
    def encode(self, frames: Tensor) -> list[Tensor]:
        """The four head layers, each a grid [B, T', h, w, C_t]."""
        cfg = self.config
        if frames.shape[1] != cfg.num_frames:
            raise ValueError(f"frames: the teacher takes {cfg.num_frames} frames, got {frames.shape[1]}")
        x = normalize_frames(frames, cfg.image_size).to(next(self.parameters()).dtype)
        extra = []
        if cfg.difference_channels:  # RGB and the change since the previous frame
            extra.append(torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], 1))
        if cfg.flow_cue:  # a Lucas-Kanade estimate of the backward flow: see flow_cue
            extra.append(flow_cue(x, cfg.flow_cue_window).to(x.dtype))
        if extra:
            x = torch.cat([x, *extra], 2)
        out = self.encoder(pixel_values=x, output_hidden_states=True)
        Tp, h, w = cfg.grid
        return [out.hidden_states[i].unflatten(1, (Tp, h, w)) for i in cfg.head_layers]

    def latent(self, frames: Tensor) -> Tensor:
        """F_4D: the teacher latent grid [B, T/2, h, w, C_t] (the last head layer)."""
        return self.encode(frames)[-1]

    # -- heads ---------------------------------------------------------------------------------
    def predict_heads(self, layers: Tensor | Sequence[Tensor]) -> dict[str, Tensor]:
        """Run the heads on four layer grids (or one grid, used for all four: the paper's single
        decoded latent). Returns raw outputs: depth (metres), flow (pixels), motion (logits),
        camray (Plücker rays)."""
        if isinstance(layers, Tensor):
            layers = [layers] * 4
        return {name: head(layers).squeeze(2) if HEAD_SPECS[name][0] == 1 else head(layers)
                for name, head in self.heads.items()}

    def forward(self, frames: Tensor) -> TeacherOutput:
        layers = self.encode(frames)
        return TeacherOutput(latent=layers[-1], layers=layers, **self.predict_heads(layers))

    def freeze(self) -> "Teacher4D":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "teacher_config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(path / "teacher.safetensors"))

    @classmethod
    def from_l4p(cls, path: str | Path, *, hooks: Sequence[int] = (14, 21, 28, 36), image_size: int = 224,
                 num_frames: int = 16, tasks: Optional[Sequence[str]] = None, num_heads: int = 16) -> "Teacher4D":
        """The L4P teacher (the released 4D-RGPT's) from its Lightning checkpoint, frozen
        (rgpt4d.models.l4p): its VideoMAEv2 encoder read at `hooks` (the i-th block's output; the last
        block's after the final norm) and its dense heads. tasks None: every head the checkpoint has
        among depth, flow_2d_backward, dyn_mask and camray (named depth, flow, motion, camray here;
        either name is accepted); (): the encoder alone. Widths and depths come from the tensors'
        shapes; num_heads (16 in L4P's ViT-g) is not stored in the checkpoint."""
        config, encoder, heads = read_l4p(path, hooks=hooks, image_size=image_size, num_frames=num_frames,
                                          tasks=tasks, num_heads=num_heads)
        teacher = L4PTeacher(config, encoder)
        teacher.heads.update(heads)
        return teacher.freeze()

    @classmethod
    def load(cls, path: str | Path, map_location: str = "cpu") -> "Teacher4D":
        """A teacher saved by `save` (a folder), or an L4P checkpoint: a `.ckpt` file or
        `l4p:PATH[?image_size=224&num_frames=16&hooks=14,21,28,36&tasks=depth,flow]` (see l4p_spec)."""
        spec = parse_l4p_spec(path)
        if spec is not None:
            return cls.from_l4p(spec.pop("path"), **spec).to(map_location)
        path = Path(path)
        if not (path / "teacher_config.json").exists():
            raise FileNotFoundError(f"{path}: no teacher_config.json (train one with `rgpt4d teacher train`)")
        model = cls(TeacherConfig.from_dict(json.loads((path / "teacher_config.json").read_text())))
        model.load_state_dict(load_file(str(path / "teacher.safetensors"), device=map_location))
        return model.freeze()


class L4PTeacher(Teacher4D):
    """Teacher4D over L4P's modules (built by Teacher4D.from_l4p): `encode` runs the VideoMAEv2
    encoder on ImageNet-normalised RGB; `predict_heads`, `forward`, `latent` and `freeze` are
    Teacher4D's. Not saved by `save` (the checkpoint is the format: load it again)."""

    def __init__(self, config: TeacherConfig, encoder: nn.Module):
        nn.Module.__init__(self)  # not Teacher4D.__init__: that builds rgpt4d's own encoder and heads
        self.config = config
        self.encoder = encoder
        self.heads = nn.ModuleDict()

    def encode(self, frames: Tensor) -> list[Tensor]:
        """The hooked layers, each [B, T', h, w, C]: entries `config.head_layers` of L4P's feature list."""
        cfg = self.config
        if frames.dim() != 5 or frames.shape[1] != cfg.num_frames:
            raise ValueError(f"frames: the teacher takes [B, {cfg.num_frames}, 3, H, W], got {tuple(frames.shape)}")
        x = normalize_frames(frames, cfg.image_size, IMAGENET_MEAN, IMAGENET_STD).to(self.encoder.norm.weight.dtype)
        feats = self.encoder.features(x.permute(0, 2, 1, 3, 4), cfg.head_layers)
        Tp, h, w = cfg.grid
        return [f.unflatten(1, (Tp, h, w)) for f in feats]

    def save(self, path) -> None:
        raise NotImplementedError("L4PTeacher.save: an L4P teacher is read from its checkpoint "
                                  "(Teacher4D.from_l4p / Teacher4D.load('l4p:PATH')); there is nothing to save")


_L4P_INT_KEYS = ("image_size", "num_frames", "num_heads")
_L4P_LIST_KEYS = ("hooks", "tasks")


def l4p_spec(path: str | Path, **options) -> str:
    """The string Teacher4D.load reads as an L4P teacher: `l4p:PATH?key=value&...` with options among
    image_size, num_frames, num_heads, hooks, tasks (None values left out). It is what a teacher cache
    records, so a student run rebuilds the very same teacher."""
    unknown = sorted(set(options) - set(_L4P_INT_KEYS + _L4P_LIST_KEYS))
    if unknown:
        raise ValueError(f"l4p_spec: unknown options {unknown}")
    query = {k: ",".join(str(x) for x in v) if k in _L4P_LIST_KEYS else int(v)
             for k, v in options.items() if v is not None}
    return f"l4p:{path}" + (f"?{urlencode(query, safe=',')}" if query else "")


def parse_l4p_spec(spec) -> Optional[dict]:
    """{"path", options...} for `l4p:PATH[?...]` or an existing `.ckpt` file; None for anything else."""
    text = str(spec)
    if not text.startswith("l4p:"):
        return {"path": text} if text.endswith(".ckpt") and Path(text).is_file() else None
    path, _, query = text[4:].partition("?")
    out: dict = {"path": path}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in _L4P_INT_KEYS:
            try:
                out[key] = int(value)
            except ValueError:
                raise ValueError(f"teacher: {key} in {text!r} must be an integer, got {value!r}") from None
        elif key in _L4P_LIST_KEYS:
            items = [x for x in value.split(",") if x]
            out[key] = tuple(int(x) for x in items) if key == "hooks" else tuple(items)
        else:
            raise ValueError(f"teacher: unknown option {key!r} in {text!r} (known: "
                             f"{list(_L4P_INT_KEYS + _L4P_LIST_KEYS)})")
    return out


# ---------------------------------------------------------------------------------------------
# Ground truth at the teacher's resolution, losses and metrics
# ---------------------------------------------------------------------------------------------


def targets_at(batch: dict, size: int) -> dict[str, Tensor]:
    """depth [B,T,S,S], flow [B,T,2,S,S] (pixels rescaled), motion [B,T,S,S] bool, and camray
    [B,T,6,S,S] when the batch has it, from a collated Synth4DVideos batch; nearest resampling for
    masks, area for depth/flow/camray. Area-averaged rays are renormalised: the averaged moment is
    o x (mean d), so dividing both by |mean d| gives the exact Plücker ray of the mean direction."""
    depth, flow, motion = batch["depth"].float(), batch["flow"].float(), batch["motion"]
    B, T, H, W = depth.shape
    ray = batch.get("camray")
    if (H, W) == (size, size):
        out = {"depth": depth, "flow": flow.permute(0, 1, 4, 2, 3), "motion": motion.bool()}
        if ray is not None:
            out["camray"] = ray.float()
        return out
    d = F.interpolate(depth.flatten(0, 1)[:, None], size=(size, size), mode="area")[:, 0].unflatten(0, (B, T))
    f = F.interpolate(flow.flatten(0, 1).permute(0, 3, 1, 2), size=(size, size), mode="area").unflatten(0, (B, T))
    f = f * torch.tensor([size / W, size / H]).view(1, 1, 2, 1, 1)
    m = F.interpolate(motion.flatten(0, 1)[:, None].float(), size=(size, size), mode="nearest")[:, 0]
    out = {"depth": d, "flow": f, "motion": m.unflatten(0, (B, T)) > 0.5}
    if ray is not None:
        r = F.interpolate(ray.float().flatten(0, 1), size=(size, size), mode="area").unflatten(0, (B, T))
        out["camray"] = r / torch.linalg.vector_norm(r[:, :, :3], dim=2, keepdim=True).clamp_min(1e-12)
    return out


def teacher_loss(out: TeacherOutput, tgt: dict[str, Tensor], frame_mask: Optional[Tensor] = None) -> tuple[Tensor, dict]:
    """Supervised loss: L1 on log depth; L1 on flow (pixels; frame 0 has no flow); for the sparse
    motion mask, BCE with the positives up-weighted by their rarity in the batch (at most 20x) plus a
    soft Dice term, so that "all static" is not a minimum; L1 on the camera rays' six channels (when
    the teacher has a camray head and the targets have rays)."""
    T = tgt["depth"].shape[1]
    fm = torch.ones(tgt["depth"].shape[:2], dtype=torch.bool) if frame_mask is None else frame_mask[:, :T]
    fm = fm.to(out.depth.device)
    flow_frames = fm.clone()
    flow_frames[:, 0] = False
    d = (torch.log(out.depth.clamp_min(1e-3)) - torch.log(tgt["depth"].clamp_min(1e-3))).abs().mean((-1, -2))
    f = (out.flow - tgt["flow"]).abs().mean((-1, -2, -3))
    gm = tgt["motion"].float()
    pos = gm[fm].mean().clamp_min(1e-4)
    pos_weight = ((1 - pos) / pos).clamp(max=20.0).detach()
    m = F.binary_cross_entropy_with_logits(out.motion, gm, reduction="none", pos_weight=pos_weight).mean((-1, -2))
    p = torch.sigmoid(out.motion)[fm]
    dice = 1 - (2 * (p * gm[fm]).sum() + 1) / (p.sum() + gm[fm].sum() + 1)
    terms = {"depth": d[fm].mean(), "flow": f[flow_frames].mean() if flow_frames.any() else f.sum() * 0,
             "motion": m[fm].mean(), "motion_dice": dice}
    total = terms["depth"] + terms["flow"] + 0.5 * terms["motion"] + 0.5 * terms["motion_dice"]
    if out.camray is not None and "camray" in tgt:
        terms["camray"] = (out.camray - tgt["camray"].to(out.camray.dtype)).abs().mean((-1, -2, -3))[fm].mean()
        total = total + terms["camray"]
    return total, {k: float(v.detach()) for k, v in terms.items()}


class TeacherMetrics:
    """Held-out quality beside trivial baselines: depth AbsRel (vs the training mean depth), flow EPE
    (vs zero flow) over all pixels and over the pixels of moving objects (ground-truth motion mask;
    most pixels only move with the camera, so the all-pixel EPE says little about objects), motion
    IoU (vs all static, which scores 0 whenever something moves), and with a camray head the rays'
    direction error (degrees) and moment error (metres, L2) over frames 1.. beside the identity
    camera (every frame's rays those of the first frame: no camera motion). Given `cue` (flow_cue of the
    frames), flow EPE is also reported for that classical estimate alone, so a teacher that only
    copies its input cue shows as such."""

    def __init__(self, mean_depth: float):
        self.mean_depth = mean_depth
        self.absrel = self.absrel_base = self.n_depth = 0.0
        self.epe = self.epe_base = self.n_flow = 0.0
        self.epe_moving = self.epe_moving_base = self.n_moving = 0.0
        self.epe_cue = self.epe_moving_cue = None
        self.inter = self.union = 0.0
        self.ray_deg = self.ray_deg_base = self.ray_moment = self.ray_moment_base = None
        self.n_ray = 0.0

    @torch.no_grad()
    def update(self, out: TeacherOutput, tgt: dict[str, Tensor], cue: Optional[Tensor] = None) -> None:
        d, gd = out.depth.float(), tgt["depth"].float()
        valid = gd > 1e-3
        self.absrel += float(((d - gd).abs() / gd.clamp_min(1e-3))[valid].sum())
        self.absrel_base += float(((self.mean_depth - gd).abs() / gd.clamp_min(1e-3))[valid].sum())
        self.n_depth += float(valid.sum())
        f, gf = out.flow[:, 1:].float(), tgt["flow"][:, 1:].float()
        err, mag = torch.linalg.vector_norm(f - gf, dim=2), torch.linalg.vector_norm(gf, dim=2)
        moving = tgt["motion"][:, 1:].bool()
        self.epe += float(err.sum())
        self.epe_base += float(mag.sum())
        self.n_flow += err.numel()
        self.epe_moving += float(err[moving].sum())
        self.epe_moving_base += float(mag[moving].sum())
        self.n_moving += float(moving.sum())
        if cue is not None:
            cue_err = torch.linalg.vector_norm(cue[:, 1:].float() - gf, dim=2)
            self.epe_cue = (self.epe_cue or 0.0) + float(cue_err.sum())
            self.epe_moving_cue = (self.epe_moving_cue or 0.0) + float(cue_err[moving].sum())
        pm, gm = out.motion > 0, tgt["motion"].bool()
        self.inter += float((pm & gm).sum())
        self.union += float((pm | gm).sum())
        if out.camray is not None and "camray" in tgt and tgt["camray"].shape[1] > 1:
            gr = tgt["camray"].float()
            deg, mom = camray_errors(out.camray[:, 1:].float(), gr[:, 1:])
            base_deg, base_mom = camray_errors(gr[:, :1].expand_as(gr[:, 1:]), gr[:, 1:])
            self.ray_deg = (self.ray_deg or 0.0) + float(deg.sum())
            self.ray_moment = (self.ray_moment or 0.0) + float(mom.sum())
            self.ray_deg_base = (self.ray_deg_base or 0.0) + float(base_deg.sum())
            self.ray_moment_base = (self.ray_moment_base or 0.0) + float(base_mom.sum())
            self.n_ray += deg.numel()

    def result(self) -> dict[str, float]:
        return {
            "depth_absrel": self.absrel / max(self.n_depth, 1), "depth_absrel_mean_baseline": self.absrel_base / max(self.n_depth, 1),
            "flow_epe": self.epe / max(self.n_flow, 1), "flow_epe_zero_baseline": self.epe_base / max(self.n_flow, 1),
            "flow_epe_moving": self.epe_moving / max(self.n_moving, 1),
            "flow_epe_moving_zero_baseline": self.epe_moving_base / max(self.n_moving, 1),
            **({} if self.epe_cue is None else {
                "flow_epe_cue_baseline": self.epe_cue / max(self.n_flow, 1),
                "flow_epe_moving_cue_baseline": self.epe_moving_cue / max(self.n_moving, 1)}),
            "motion_iou": self.inter / max(self.union, 1), "motion_iou_static_baseline": 0.0,
            **({} if self.ray_deg is None else {
                "camray_deg": self.ray_deg / max(self.n_ray, 1),
                "camray_deg_identity_baseline": self.ray_deg_base / max(self.n_ray, 1),
                "camray_moment": self.ray_moment / max(self.n_ray, 1),
                "camray_moment_identity_baseline": self.ray_moment_base / max(self.n_ray, 1)}),
        }


def camray_errors(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel errors of Plücker rays [..., 6, H, W]: the angle (degrees) between the predicted
    direction (normalised) and the target's, and the L2 distance of the moments. Returns two
    [..., H, W] tensors."""
    cos = F.cosine_similarity(pred[..., :3, :, :], target[..., :3, :, :], dim=-3, eps=1e-8)
    deg = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
    return deg, torch.linalg.vector_norm(pred[..., 3:, :, :] - target[..., 3:, :, :], dim=-3)
