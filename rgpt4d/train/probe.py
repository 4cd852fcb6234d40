"""What a student's visual tokens hold: held-out linear probes of depth and motion.

For every visual token of a video (frame t, token cell i, j of the student's downsampled grid) the
probe target is the mean log depth of the pixels the cell covers and the fraction of them that
belong to a moving object (the synthetic ground truth). A ridge regression from the token's
features to each target is fitted on one split and scored (R^2) on another:

    features "hidden": the LLM's last-layer hidden states at the visual tokens (what P4D distils into)
    features "vision": the frozen vision tower's patch features of the cell, concatenated (the
                       projector's input: the floor any student starts from)

`ridge_probe` is the probe itself (any features, any scalar target); `probe_student` runs it for a
saved student on a synthetic dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from rgpt4d.data import Synth4DVideos, collate
from rgpt4d.data.schema import format_prompt
from rgpt4d.infer import RGPT4D
from rgpt4d.models.frames import normalize_frames

PROBE_TARGETS = ("depth", "motion")
FEATURE_KINDS = ("hidden", "vision")


def ridge_probe(X_fit: Tensor, y_fit: Tensor, X_eval: Tensor, y_eval: Tensor,
                strengths: Sequence[float] = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0), folds: int = 2) -> dict:
    """Fit a ridge regression of y on X (features standardised on the fit set, an intercept) and
    score it on the eval set. The ridge strength is chosen by cross-validation inside the fit set
    (`folds` contiguous blocks: with samples ordered by video, tokens of one video stay together),
    then the probe is refitted on the whole fit set. Returns {"r2" (eval), "strength", "n_fit",
    "n_eval"}; R^2 = 1 - SSE / SS of y_eval about its own mean (0: no better than a constant, can be
    negative)."""
    X_fit, X_eval = X_fit.double().flatten(1), X_eval.double().flatten(1)
    y_fit, y_eval = y_fit.double().flatten(), y_eval.double().flatten()
    if X_fit.shape[0] != y_fit.shape[0] or X_eval.shape[0] != y_eval.shape[0] or X_fit.shape[1] != X_eval.shape[1]:
        raise ValueError(f"ridge_probe: X_fit {tuple(X_fit.shape)} / y_fit {tuple(y_fit.shape)} and X_eval "
                         f"{tuple(X_eval.shape)} / y_eval {tuple(y_eval.shape)} do not match")
    if X_fit.shape[0] < 2 * folds or X_eval.shape[0] < 2:
        raise ValueError(f"ridge_probe: too few samples ({X_fit.shape[0]} to fit, {X_eval.shape[0]} to score)")

    def fit(X, y, lam):
        mu, sd = X.mean(0), X.std(0) + 1e-8
        A = (X - mu) / sd
        w = torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1], dtype=A.dtype), A.T @ (y - y.mean()))
        return lambda Z: ((Z - mu) / sd) @ w + y.mean()

    def r2(pred, y):
        return float(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp_min(1e-12))

    blocks = torch.arange(X_fit.shape[0]) * folds // X_fit.shape[0]
    best = None
    for lam in strengths:
        score = sum(r2(fit(X_fit[blocks != k], y_fit[blocks != k], lam)(X_fit[blocks == k]), y_fit[blocks == k])
                    for k in range(folds)) / folds
        if best is None or score > best[0]:
            best = (score, lam)
    pred = fit(X_fit, y_fit, best[1])(X_eval)
    return {"r2": r2(pred, y_eval), "strength": best[1], "n_fit": X_fit.shape[0], "n_eval": X_eval.shape[0]}


def cell_means(maps: Tensor, image_size: int, patch: int, window: int) -> Tensor:
    """[B, T, H, W] pixel maps -> [B, T, G, G]: the mean over the pixels of each visual token's cell
    (token (i, j) covers patches [i*window, (i+1)*window) of the student's patch grid, the last
    cell clipped to the image)."""
    B, T = maps.shape[:2]
    x = maps.float().flatten(0, 1)[:, None]
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="area")
    cell = patch * window
    G = -(-image_size // cell)
    pad = G * cell - image_size
    total = F.avg_pool2d(F.pad(x, (0, pad, 0, pad)), cell, divisor_override=1)
    count = F.avg_pool2d(F.pad(torch.ones_like(x), (0, pad, 0, pad)), cell, divisor_override=1)
    return (total / count)[:, 0].unflatten(0, (B, T))


def window_features(feats: Tensor, window: int) -> Tensor:
    """Patch features [N, g, g, D] -> [N, G, G, window*window*D]: each token cell's patches
    concatenated (zero past the grid's edge), as the projector's window downsample sees them."""
    N, g, _, D = feats.shape
    G = -(-g // window)
    x = F.pad(feats.permute(0, 3, 1, 2), (0, G * window - g, 0, G * window - g))
    x = F.unfold(x, window, stride=window)  # [N, D*w*w, G*G]
    return x.transpose(1, 2).reshape(N, G, G, -1)


@torch.no_grad()
def token_features(wrapper, batch: dict, kind: str) -> Tensor:
    """[B, T, G, G, D] features of the visual tokens of a Synth4DVideos batch (frames, timestamps)."""
    model = wrapper.model
    cfg = model.config
    frames = batch["frames"]
    if kind == "vision":
        B, T = frames.shape[:2]
        f = model.vision_features(normalize_frames(frames.to(wrapper.device), cfg.image_size).flatten(0, 1))
        g = cfg.patch_grid
        return window_features(f.float().unflatten(1, (g, g)), cfg.downsample_window).unflatten(0, (B, T)).cpu()
    if kind != "hidden":
        raise ValueError(f"kind: must be one of {FEATURE_KINDS}, got {kind!r}")
    # visual tokens come before the text, so under causal attention their states do not depend on it
    prompt = format_prompt("Describe the scene.", [])
    items = [dict(video=frames[i], timestamps=batch["timestamps"][i], regions=[], prompt=prompt,
                  som_image=frames[i, 0] if cfg.region_mode in ("som", "both") else None)
             for i in range(frames.shape[0])]
    inputs = wrapper._prepare(items)
    return model(**inputs, output_visual_hidden=True, return_logits=False).visual_hidden.float().cpu()


def probe_data(wrapper, data_dir, split: str, kinds: Sequence[str] = FEATURE_KINDS, batch_size: int = 8,
               max_videos: Optional[int] = None) -> tuple[dict, dict]:
    """Features {kind: [n, D]} and targets {"depth" (mean log metres), "motion" (moving fraction): [n]}
    of every visual token of `split`'s videos (the first `max_videos`), ordered by video."""
    cfg = wrapper.model.config
    ds = Synth4DVideos(data_dir, split, fields=("rgb", "depth", "motion"))
    if len(ds) == 0:
        raise ValueError(f"data: no {split} videos in {data_dir}")
    if max_videos is not None:
        ds = Subset(ds, range(min(max_videos, len(ds))))
    feats: dict[str, list] = {k: [] for k in kinds}
    tgts: dict[str, list] = {k: [] for k in PROBE_TARGETS}
    patch = int(cfg.vision_config["patch_size"])
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collate):
        if batch["frames"].shape[1] != cfg.num_frames:
            raise ValueError(f"data: videos have {batch['frames'].shape[1]} frames, the student takes {cfg.num_frames}")
        for k in kinds:
            feats[k].append(token_features(wrapper, batch, k).flatten(0, 3))
        depth = cell_means(batch["depth"].clamp_min(1e-3).log(), cfg.image_size, patch, cfg.downsample_window)
        tgts["depth"].append(depth.flatten())
        tgts["motion"].append(cell_means(batch["motion"], cfg.image_size, patch, cfg.downsample_window).flatten())
    return {k: torch.cat(v) for k, v in feats.items()}, {k: torch.cat(v) for k, v in tgts.items()}


def probe_student(model_path: str | Path, data_dir, fit_split: str = "val", eval_split: str = "test",
                  kinds: Sequence[str] = FEATURE_KINDS, max_videos: Optional[int] = None,
                  batch_size: int = 8) -> dict:
    """{kind: {target: ridge_probe result}} for a saved student: probes fitted on `fit_split`'s
    visual tokens, scored on `eval_split`'s."""
    wrapper = RGPT4D.from_pretrained(model_path)
    Xf, yf = probe_data(wrapper, data_dir, fit_split, kinds, batch_size, max_videos)
    Xe, ye = probe_data(wrapper, data_dir, eval_split, kinds, batch_size, max_videos)
    return {k: {t: ridge_probe(Xf[k], yf[t], Xe[k], ye[t]) for t in PROBE_TARGETS} for k in kinds}
