"""Frame preprocessing shared by the teacher and the student: uint8 or [0, 1] frames to the
normalised, resized float input of a vision encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def normalize_frames(frames: Tensor, size: int, mean=IMAGE_MEAN, std=IMAGE_STD) -> Tensor:
    """uint8 (0..255) or float (0..1) frames [B, T, 3, H, W] -> float (x - mean) / std, resized to
    size x size; mean and std: one number or one per RGB channel."""
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be [B, T, 3, H, W], got {tuple(frames.shape)}")
    x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    B, T = x.shape[:2]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x.flatten(0, 1), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True).unflatten(0, (B, T))
    if not isinstance(mean, (int, float)):
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(3, 1, 1) for v in (mean, std))
    return (x - mean) / std
