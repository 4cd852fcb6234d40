"""The L4P teacher (NVlabs/L4P, the teacher of the released 4D-RGPT) read from its Lightning checkpoint.

    teacher = Teacher4D.from_l4p("l4p_depth_flow_2d3dtrack_camray_dynseg_v1.ckpt")
    layers = teacher.encode(frames)         # hooks 14, 21, 28, 36: four [B, T/2, 16, 16, 1408]
    out = teacher(frames)                   # TeacherOutput: latent, layers, depth, flow, motion, camray

Layout (torch.load(path)["state_dict"]; ../shared/CHECKPOINTS.md):
- `l4p_model.video_encoder.*`: a VideoMAEv2 ViT (ViT-g: 1408 wide, 40 blocks, 16 heads, MLP 6144,
  patch 14, tubelet 2). Conv3d patch embedding, a fixed sinusoid position table (not stored), pre-norm
  blocks whose attention has one fused qkv weight and separate q and v biases (the key bias is zero),
  GELU MLPs, a final LayerNorm (eps 1e-6). L4P's feature list is [patch embedding + positions,
  block 1, ..., block depth], the last one after the final norm; a hook i is entry i of that list.
- `l4p_model.task_heads.<task>.task_head.dpt.*`: one DPT head per task with 3-D convolutions, reading
  the four hooked layers: `act_postprocess.k` (1x1x1 Conv3d to 256/512/1024/1024 channels, then a
  ConvTranspose3d upsampling, a strided Conv3d downsampling or nothing, per task), `scratch.layer_rn.k`
  (3x3x3 Conv3d without bias to the fusion width; the same tensors are also stored as
  `scratch.layer{k+1}_rn`), `scratch.refinenet1..4` (residual units, trilinear upsampling with
  align_corners, 1x1x1 out_conv), `head1` (3x3x3 conv), a trilinear resize to the output size, `head2`
  (3x3x3 conv, ReLU, 1x1x1 conv). Tasks: depth (exp applied: metres), flow_2d_backward (pixels),
  dyn_mask (logits), camray (6-channel Plücker rays, direction then moment, at T x h x w: one ray per
  frame and patch); named depth, flow, motion and camray here. track_2d (a sparse head) is not read.

Input: RGB in [0, 1] normalised with the ImageNet mean and std, no extra cue channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgpt4d.models.configs import TeacherConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_PREFIX = "l4p_model.video_encoder."
HEADS_PREFIX = "l4p_model.task_heads."
# L4P task -> (name here, output activation)
L4P_TASKS = {"depth": ("depth", "exp"), "flow_2d_backward": ("flow", "none"), "dyn_mask": ("motion", "none"),
             "camray": ("camray", "none")}
# upsampling factors (t, h, w) of refinenet1..4, which the checkpoint does not store (L4P's defaults:
# dense maps end at a quarter of the pixels and are resized to them; camray stays at the token grid)
_FUSION_SCALES = {"dense": ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
                  "camray": ((1, 1, 1), (1, 1, 1), (2, 1, 1), (2, 2, 2))}
LN_EPS = 1e-6


def sinusoid_table(n: int, dim: int) -> Tensor:
    """VideoMAE's fixed positions [n, dim]: angle p / 10000^(2 floor(j/2) / dim), sin on even j, cos on
    odd j; computed in float64 and rounded to float32 once (as L4P's numpy table)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()


# ---------------------------------------------------------------------------------------------
# VideoMAEv2 encoder
# ---------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(head_dim)) v, as L4P (its scale is head_dim ** -0.5)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = _Mlp(dim, mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int, tubelet: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))


class VideoMAEv2Encoder(nn.Module):
    """L4P's video encoder. `features(x, hooks)`: the entries `hooks` of L4P's feature list, each
    [B, T' * h * w, C] (token order t, h, w); only the blocks up to the deepest hook run."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_hidden: int, patch: int, tubelet: int,
                 num_tokens: int):
        super().__init__()
        self.depth = depth
        self.patch_embed = _PatchEmbed(dim, patch, tubelet)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.register_buffer("pos_embed", sinusoid_table(num_tokens, dim), persistent=False)

    def features(self, x: Tensor, hooks: Sequence[int]) -> list[Tensor]:
        """x: normalised video [B, 3, T, H, W]."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        if x.shape[1] != self.pos_embed.shape[0]:
            raise ValueError(f"frames: {x.shape[1]} tokens but the encoder's position table has "
                             f"{self.pos_embed.shape[0]} (image_size / num_frames differ from the teacher's)")
        x = x + self.pos_embed.to(x.dtype)
        feats = {0: x}
        for i in range(1, max(hooks) + 1):
            x = self.blocks[i - 1](x)
            feats[i] = self.norm(x) if i == self.depth else x
        return [feats[i] for i in hooks]


# ---------------------------------------------------------------------------------------------
# DPT heads (3-D convolutions)
# ---------------------------------------------------------------------------------------------


class _ResidualUnit(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv3d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv3d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _Fusion(nn.Module):
    def __init__(self, dim: int, scale: tuple):
        super().__init__()
        self.scale = tuple(float(s) for s in scale)
        self.out_conv = nn.Conv3d(dim, dim, 1)
        self.resConfUnit1 = _ResidualUnit(dim)
        self.resConfUnit2 = _ResidualUnit(dim)

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = F.interpolate(self.resConfUnit2(x), scale_factor=self.scale, mode="trilinear", align_corners=True)
        return self.out_conv(x)


def _resampler(weight_shape: Optional[tuple], channels: int) -> nn.Module:
    """act_postprocess.k.1 from its weight shape: an even kernel side is a ConvTranspose3d with
    stride = kernel (upsampling by 2^s); odd sides are a Conv3d with stride max(1, kernel - 1) and
    padding kernel // 2 (downsampling); no weight: identity."""
    if weight_shape is None:
        return nn.Identity()
    k = tuple(weight_shape[2:])
    if any(s % 2 == 0 for s in k):
        return nn.ConvTranspose3d(channels, channels, k, stride=k)
    stride = tuple(max(1, s - 1) for s in k)
    return nn.Conv3d(channels, channels, k, stride=stride, padding=tuple(s // 2 for s in k))


class _Scratch(nn.Module):
    def __init__(self, layer_dims: Sequence[int], features: int, fusion_scales):
        super().__init__()
        self.layer_rn = nn.ModuleList(nn.Conv3d(c, features, 3, padding=1, bias=False) for c in layer_dims)
        for i, scale in enumerate(fusion_scales):
            self.add_module(f"refinenet{i + 1}", _Fusion(features, scale))


class _DPT(nn.Module):
    def __init__(self, embed_dim: int, layer_dims: Sequence[int], resample_shapes: Sequence[Optional[tuple]],
                 features: int, last_dim: int, out_channels: int, fusion_scales):
        super().__init__()
        self.act_postprocess = nn.ModuleList(
            nn.Sequential(nn.Conv3d(embed_dim, c, 1), _resampler(shape, c))
            for c, shape in zip(layer_dims, resample_shapes))
        self.scratch = _Scratch(layer_dims, features, fusion_scales)
        self.head1 = nn.Sequential(nn.Conv3d(features, features // 2, 3, padding=1))
        self.head2 = nn.Sequential(nn.Conv3d(features // 2, last_dim, 3, padding=1), nn.ReLU(),
                                   nn.Conv3d(last_dim, out_channels, 1))


class _TaskHead(nn.Module):
    def __init__(self, dpt: _DPT):
        super().__init__()
        self.dpt = dpt


class L4PDenseHead(nn.Module):
    """One of L4P's DPT heads. Called like rgpt4d's DPTHead: four grids [B, T', h, w, C] ->
    [B, T' * tubelet, out_channels, H, W]; H, W = the pixels (h * patch) for dense maps, the token grid
    for camray (`output="tokens"`)."""

    def __init__(self, embed_dim: int, layer_dims: Sequence[int], resample_shapes, features: int, last_dim: int,
                 out_channels: int, patch: int, tubelet: int, activation: str = "none", output: str = "pixels"):
        super().__init__()
        self.out_channels, self.patch, self.tubelet = out_channels, patch, tubelet
        self.activation, self.output = activation, output
        self.task_head = _TaskHead(_DPT(embed_dim, layer_dims, resample_shapes, features, last_dim, out_channels,
                                        _FUSION_SCALES["camray" if output == "tokens" else "dense"]))

    def forward(self, layers: Sequence[Tensor]) -> Tensor:
        if len(layers) != 4:
            raise ValueError(f"L4PDenseHead: expected four layer grids, got {len(layers)}")
        dpt = self.task_head.dpt
        B, Tp, h, w, _ = layers[0].shape
        maps = [post(g.permute(0, 4, 1, 2, 3)) for post, g in zip(dpt.act_postprocess, layers)]  # [B, c, t, y, x]
        maps = [rn(m) for rn, m in zip(dpt.scratch.layer_rn, maps)]
        s = dpt.scratch
        # L4P crops the coarsest path to the next level's extent in time and height
        path = s.refinenet4(maps[3])[:, :, :maps[2].shape[2], :maps[2].shape[3]]
        path = s.refinenet3(path, maps[2])
        path = s.refinenet2(path, maps[1])
        path = s.refinenet1(path, maps[0])
        out = dpt.head1(path)
        T = Tp * self.tubelet
        size = (T, h * self.patch, w * self.patch) if self.output == "pixels" else (T, h, w)
        if tuple(out.shape[-3:]) != size:
            out = F.interpolate(out, size=size, mode="trilinear", align_corners=True)
        out = dpt.head2(out)
        if self.activation == "exp":
            out = torch.exp(out)
        return out.permute(0, 2, 1, 3, 4)  # [B, T, C, H, W]


# ---------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------


def _read_state_dict(path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no L4P checkpoint at {path}")
    # mmap: the tensors are read from the file as the modules copy them (no second copy of ~1B weights)
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"path: {path} is not a Lightning checkpoint (no 'state_dict')")
    if not any(k.startswith(ENCODER_PREFIX) for k in sd):
        raise ValueError(f"path: {path} holds no '{ENCODER_PREFIX}*' keys: not an L4P checkpoint")
    return sd


def _sub(sd: dict, prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def read_l4p(path, *, hooks=(14, 21, 28, 36), image_size: int = 224, num_frames: int = 16, tasks=None,
             num_heads: int = 16) -> tuple[TeacherConfig, VideoMAEv2Encoder, dict[str, nn.Module]]:
    """The L4P teacher's config, encoder and heads {name: head}, weights loaded from its checkpoint;
    Teacher4D.from_l4p assembles them (rgpt4d.models.teacher.L4PTeacher)."""
    sd = _read_state_dict(path)
    enc = _sub(sd, ENCODER_PREFIX)
    w = enc.get("patch_embed.proj.weight")
    if w is None or w.dim() != 5:
        raise ValueError(f"path: {path}: no 5-D patch_embed.proj.weight in the encoder")
    dim, _, tubelet, patch, _ = w.shape
    depth = 1 + max((int(k.split(".")[1]) for k in enc if k.startswith("blocks.")), default=-1)
    if depth < 1:
        raise ValueError(f"path: {path}: the encoder has no blocks")
    mlp_hidden = enc["blocks.0.mlp.fc1.weight"].shape[0]
    if dim % num_heads:
        raise ValueError(f"num_heads: {num_heads} does not divide the encoder width {dim}")
    hooks = tuple(int(h) for h in hooks)
    if len(hooks) != 4 or not all(1 <= h <= depth for h in hooks):
        raise ValueError(f"hooks: four encoder layers in 1..{depth} expected, got {hooks}")
    if image_size % patch or num_frames % tubelet:
        raise ValueError(f"image_size / num_frames: must be multiples of the patch {patch} / tubelet {tubelet}, "
                         f"got {image_size} / {num_frames}")
    present = {k.split(".")[0] for k in _sub(sd, HEADS_PREFIX)}
    if tasks is None:
        tasks = [t for t in L4P_TASKS if t in present]
    else:
        by_name = {name: t for t, (name, _) in L4P_TASKS.items()}
        tasks = [by_name.get(t, t) for t in tasks]
        for t in tasks:
            if t not in L4P_TASKS:
                raise ValueError(f"tasks: {t!r} is not one of {sorted(L4P_TASKS)} (or {sorted(by_name)})")
            if t not in present:
                raise ValueError(f"tasks: the checkpoint has no {t!r} head (it has {sorted(present)})")
    config = TeacherConfig(image_size=image_size, patch_size=patch, num_frames=num_frames, tubelet_size=tubelet,
                           hidden_size=dim, num_hidden_layers=depth, num_attention_heads=num_heads,
                           intermediate_size=mlp_hidden, head_layers=hooks,
                           heads=tuple(L4P_TASKS[t][0] for t in tasks), difference_channels=False, flow_cue=False)
    grid = (num_frames // tubelet) * (image_size // patch) ** 2
    # the encoder and the latent first (all that L_LD needs), then the heads
    encoder = VideoMAEv2Encoder(dim, depth, num_heads, mlp_hidden, patch, tubelet, grid)
    _load(encoder, {k: v for k, v in enc.items() if not k.startswith("head.")}, f"{path}: video_encoder")
    heads = {}
    for t in tasks:
        name, activation = L4P_TASKS[t]
        hsd = _sub(sd, f"{HEADS_PREFIX}{t}.")
        prefix = "task_head.dpt."
        layer_dims = [hsd[f"{prefix}act_postprocess.{i}.0.weight"].shape[0] for i in range(4)]
        resample = [tuple(hsd[k].shape) if (k := f"{prefix}act_postprocess.{i}.1.weight") in hsd else None
                    for i in range(4)]
        features = hsd[f"{prefix}scratch.layer_rn.0.weight"].shape[0] if f"{prefix}scratch.layer_rn.0.weight" in hsd \
            else hsd[f"{prefix}scratch.layer1_rn.weight"].shape[0]
        last_dim = hsd[f"{prefix}head2.0.weight"].shape[0]
        out_channels = hsd[f"{prefix}head2.2.weight"].shape[0]
        head = L4PDenseHead(dim, layer_dims, resample, features, last_dim, out_channels, patch, tubelet, activation,
                            "tokens" if t == "camray" else "pixels")
        # scratch.layer{k}_rn and scratch.layer_rn.{k-1} are the same tensors stored twice: keep one name
        for i in range(4):
            dup = hsd.pop(f"{prefix}scratch.layer{i + 1}_rn.weight", None)
            if dup is not None:
                hsd.setdefault(f"{prefix}scratch.layer_rn.{i}.weight", dup)
        _load(head, hsd, f"{path}: task head {t}")
        heads[name] = head
    return config, encoder, heads


def _load(module: nn.Module, sd: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{what}: the checkpoint does not fit L4P's layout: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")
