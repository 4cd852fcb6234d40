"""The 4D regional encoder: region tokens for <obj_N> placeholders.

Per frame and region: pool the vision features inside the region (RoIAlign of a box, or a soft
mask average as SpatialRGPT), add the frame's Timestamp Positional Encoding (fused into the pooling
kernel), flatten the ph x pw cells and project with a Linear to the LLM width.

    encoder = RegionalEncoder4D(vision_dim=1152, llm_dim=3584, mode="box", spatial_scale=27 / 384)
    tokens = encoder(features, boxes, timestamps)   # [B, T, R, llm_dim]

Regions are given per frame ([B, T, R, 4] boxes / [B, T, R, Hm, Wm] masks) or on the first frame
only ([B, R, 4] / [B, R, Hm, Wm]): R4D-Bench marks regions on a key frame, and the same region is
then pooled from every frame (boxes repeated over frames).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from rgpt4d.ops.regional import mask_pool, region_pool


@dataclass
class RegionalEncoderConfig:
    vision_dim: int
    llm_dim: int
    mode: str = "box"                 # "box": region_pool (RoIAlign); "mask": mask_pool
    output_size: tuple = (1, 1)       # box mode: ph x pw cells per region, flattened into the Linear
    spatial_scale: float = 1.0        # box coordinates -> feature grid
    sampling_ratio: int = -1
    aligned: bool = True
    tpe: str = "learned"              # "learned" (table, integer frame indices), "sinusoidal" (seconds), "none"
    max_frames: int = 500             # rows of the learned table
    tpe_base: float = 10000.0
    eps: float = 1e-8                 # mask mode: sum(f m) / (sum(m) + eps)
    channels_last: bool = False       # features as [B, T, H, W, C] (vision tokens on their grid)
    backend: Optional[str] = None


class RegionalEncoder4D(nn.Module):
    """region_pool or mask_pool + TPE + Linear to the LLM width (see the module docstring)."""

    def __init__(self, vision_dim: int, llm_dim: int, **kwargs):
        super().__init__()
        cfg = RegionalEncoderConfig(vision_dim, llm_dim, **kwargs)
        if cfg.mode not in ("box", "mask"):
            raise ValueError(f"RegionalEncoder4D: mode must be 'box' or 'mask', got {cfg.mode!r}")
        if cfg.tpe not in ("learned", "sinusoidal", "none"):
            raise ValueError(f"RegionalEncoder4D: tpe must be 'learned', 'sinusoidal' or 'none', got {cfg.tpe!r}")
        self.cfg = cfg
        ph, pw = (cfg.output_size, cfg.output_size) if isinstance(cfg.output_size, int) else cfg.output_size
        self.output_size = (int(ph), int(pw)) if cfg.mode == "box" else (1, 1)
        # The seed's learned TPE: a zero-initialised table indexed by frame.
        self.tpe_table = nn.Parameter(torch.zeros(cfg.max_frames, vision_dim)) if cfg.tpe == "learned" else None
        self.proj = nn.Linear(vision_dim * self.output_size[0] * self.output_size[1], llm_dim)

    def _timestamps(self, timestamps: Optional[Tensor], B: int, T: int, device) -> Optional[Tensor]:
        if self.cfg.tpe == "none":
            return None
        if timestamps is None:
            if self.cfg.tpe == "sinusoidal":
                raise ValueError("RegionalEncoder4D: the sinusoidal TPE needs timestamps (seconds, [B, T])")
            timestamps = torch.arange(T, device=device).expand(B, T)  # learned: frame indices
        return timestamps

    def forward(self, features: Tensor, regions: Tensor, timestamps: Optional[Tensor] = None,
                valid: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            features: [B, T, C, H, W] (or [B, T, H, W, C] with channels_last=True).
            regions: box mode: [B, T, R, 4] per frame, or [B, R, 4] / [B, 1, R, 4] on the first frame
                (repeated over frames). Mask mode: [B, T, R, Hm, Wm], or [B, R, Hm, Wm] / [B, 1, R, Hm, Wm].
            timestamps: [B, T]: integer frame indices (learned TPE; default 0..T-1) or float seconds
                (sinusoidal TPE).
            valid: box mode: optional bool [B, T, R] (absent region -> zero token before the Linear),
                or [B, R] for first-frame regions.

        Returns [B, T, R, llm_dim].
        """
        cfg = self.cfg
        B, T = features.shape[:2]
        regions = self._per_frame(regions, T, 4 if cfg.mode == "box" else 5)
        if valid is not None and valid.dim() == 2:
            valid = valid.unsqueeze(1).expand(B, T, valid.shape[1])
        ts = self._timestamps(timestamps, B, T, features.device)
        if cfg.mode == "box":
            tokens = region_pool(features, regions, output_size=self.output_size, spatial_scale=cfg.spatial_scale,
                                 sampling_ratio=cfg.sampling_ratio, aligned=cfg.aligned, valid=valid, timestamps=ts,
                                 table=self.tpe_table, base=cfg.tpe_base, channels_last=cfg.channels_last,
                                 backend=cfg.backend)
        else:
            if valid is not None:
                raise ValueError("RegionalEncoder4D: `valid` is for box mode; give absent regions an empty mask")
            tokens = mask_pool(features, regions, eps=cfg.eps, timestamps=ts, table=self.tpe_table,
                               base=cfg.tpe_base, channels_last=cfg.channels_last, backend=cfg.backend)
        return self.proj(tokens.flatten(3) if tokens.dim() == 6 else tokens)

    @staticmethod
    def _per_frame(regions: Tensor, T: int, per_frame_dims: int) -> Tensor:
        """Regions on the first frame only ([B, R, ...] or [B, 1, R, ...]) repeated over the T frames."""
        if regions.dim() == per_frame_dims - 1:  # [B, R, ...]
            return regions.unsqueeze(1).expand(regions.shape[0], T, *regions.shape[1:])
        if regions.dim() == per_frame_dims and regions.shape[1] == 1 and T != 1:  # [B, 1, R, ...]
            return regions.expand(regions.shape[0], T, *regions.shape[2:])
        return regions  # [B, T, R, ...]; a wrong rank gets region_pool's / mask_pool's clear error

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"mode={c.mode!r}, output_size={self.output_size}, tpe={c.tpe!r}, spatial_scale={c.spatial_scale}, "
                f"vision_dim={c.vision_dim}, llm_dim={c.llm_dim}")
