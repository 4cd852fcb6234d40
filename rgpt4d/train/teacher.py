"""Teacher training on the shared loop: supervised on the synthetic ground truth (depth, backward
flow, motion, camera rays; rgpt4d.models.teacher.teacher_loss), then frozen, evaluated on val beside trivial
baselines, and saved to `out_dir` (Teacher4D.save: teacher_config.json + teacher.safetensors), next
to `metrics.jsonl`, `checkpoints/` and `teacher_metrics.json`.

It uses the TrainConfig's teacher_steps / teacher_batch_size / teacher_lr (and its weight decay,
warmup, clipping, seed, device, checkpointing); gradient accumulation is not used for the teacher.
`train_teacher_from_preset` takes a preset name and the few numbers `rgpt4d teacher train` gives.
Caching its outputs for the student: rgpt4d.train.teacher_cache (`rgpt4d teacher cache`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader

from rgpt4d.data import Synth4DVideos, collate
from rgpt4d.models.configs import TeacherConfig, get_preset
from rgpt4d.models.frames import normalize_frames
from rgpt4d.models.teacher import Teacher4D, TeacherMetrics, flow_cue, targets_at, teacher_loss
from rgpt4d.train.config import TRAIN_PRESETS, TrainConfig, train_config
from rgpt4d.train.loop import add_nvtx_hooks, ops_backend, resolve_device, run_loop, setup_distributed

FIELDS = ("rgb", "depth", "flow", "motion", "camray")


def video_loader(data_dir, split, batch_size, shuffle, seed=0) -> DataLoader:
    """The videos of `split` with every teacher target, collated (rgpt4d.data.collate)."""
    ds = Synth4DVideos(data_dir, split, fields=FIELDS)
    if len(ds) == 0:
        raise ValueError(f"data: no {split} videos in {data_dir}")
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=g)


def check_frames(num_frames: int, batch: dict) -> None:
    if batch["frames"].shape[1] != num_frames:
        raise ValueError(f"data: videos have {batch['frames'].shape[1]} frames but the teacher takes "
                         f"{num_frames}; make the data with --frames {num_frames}")


class TeacherCollate:
    def __init__(self, num_frames: int):
        self.num_frames = num_frames

    def __call__(self, items: list[dict]) -> dict:
        batch = collate(items)
        check_frames(self.num_frames, batch)
        return {k: batch[k] for k in ("frames", "depth", "flow", "motion", "camray", "frame_mask") if k in batch}


class TeacherLoss:
    def __init__(self, image_size: int, tokens_per_video: int):
        self.image_size, self.tokens_per_video = image_size, tokens_per_video

    def __call__(self, model, batch: dict):
        loss, terms = teacher_loss(model(batch["frames"]), targets_at(batch, self.image_size), batch["frame_mask"])
        return loss, terms, batch["frames"].shape[0] * self.tokens_per_video


def _teacher_run_config(config: TrainConfig) -> TrainConfig:
    return config.replace(steps=config.teacher_steps, epochs=0.0, batch_size=config.teacher_batch_size,
                          grad_accum=1, lr=config.teacher_lr)


@torch.no_grad()
def _mean_depth(data_dir, image_size: int, max_batches: int = 16) -> float:
    total = n = 0.0
    for i, batch in enumerate(video_loader(data_dir, "train", 4, False)):
        if i >= max_batches:
            break
        d = targets_at(batch, image_size)["depth"]
        total, n = total + float(d.sum()), n + d.numel()
    return total / max(n, 1)


def train_teacher(config: TrainConfig, data_dir: str | Path, out_dir: str | Path = "runs/teacher", *,
                  resume: bool = False, progress: bool = True, teacher_config=None,
                  stop_at_step: Optional[int] = None, log: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """Train the teacher of config.preset (or `teacher_config`, a TeacherConfig) on the train split.

    Returns {"steps", "seconds", "tokens_per_s", "loss" and the loss terms (last logged),
    "metrics" (held-out, with baselines; None if stopped early), "teacher_path"}; also written to
    `<out_dir>/teacher_metrics.json`.
    """
    config = config.validate()
    run_cfg = _teacher_run_config(config)
    out_dir = Path(out_dir)
    device = resolve_device(config)
    dist = setup_distributed(device)
    cfg = teacher_config or get_preset(config.preset).teacher
    try:
        with ops_backend(config.ops):
            torch.manual_seed(config.seed)
            teacher = Teacher4D(cfg).train().to(device)
            add_nvtx_hooks({"teacher_encoder": teacher.encoder, "teacher_heads": teacher.heads})
            dataset = Synth4DVideos(data_dir, "train", fields=FIELDS)
            Tp, h, w = cfg.grid
            res = run_loop(teacher, dataset, TeacherCollate(cfg.num_frames), TeacherLoss(cfg.image_size, Tp * h * w),
                           run_cfg, out_dir, lr=run_cfg.lr, name="teacher", resume=resume, progress=progress,
                           stop_at_step=stop_at_step, metadata={"data_dir": str(data_dir), "teacher": cfg.to_dict()},
                           dist=dist, device=device, log=log)
            metrics, path = None, None
            if res.steps >= run_cfg.steps and dist.main:
                teacher.freeze().cpu()
                metrics = evaluate_teacher(teacher, data_dir, "val", run_cfg.batch_size,
                                           mean_depth=_mean_depth(data_dir, cfg.image_size))
                teacher.save(out_dir)
                path = str(out_dir)
        result = {"steps": res.steps, "seconds": res.seconds, "tokens_per_s": res.tokens_per_s,
                  **{k: v for k, v in res.last.items() if k not in ("step", "epoch", "seconds", "tokens_per_s")},
                  "metrics": metrics, "teacher_path": path, "resumed_from": res.resumed_from}
        if dist.main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "teacher_metrics.json").write_text(json.dumps(result, indent=2))
            if log is not None and metrics is not None:
                m = metrics
                log(f"teacher: depth AbsRel {m['depth_absrel']:.3f} (mean-depth baseline "
                    f"{m['depth_absrel_mean_baseline']:.3f}), flow EPE {m['flow_epe']:.3f} px (zero-flow "
                    f"{m['flow_epe_zero_baseline']:.3f}, Lucas-Kanade cue alone {m['flow_epe_cue_baseline']:.3f}; on "
                    f"moving objects {m['flow_epe_moving']:.3f} vs {m['flow_epe_moving_zero_baseline']:.3f} and "
                    f"{m['flow_epe_moving_cue_baseline']:.3f}), motion IoU {m['motion_iou']:.3f} (all-static 0.000)"
                    + (f", camera rays {m['camray_deg']:.2f} deg / moment {m['camray_moment']:.3f} m (identity "
                       f"camera {m['camray_deg_identity_baseline']:.2f} / {m['camray_moment_identity_baseline']:.3f})"
                       if "camray_deg" in m else ""))
    finally:
        if dist.started_here:
            tdist.destroy_process_group()
    return result


def train_teacher_from_preset(data_dir, out, *, preset: str = "tiny", config: Optional[TeacherConfig] = None,
                              steps: int = 200, batch_size: int = 4, lr: float = 1e-3, weight_decay: float = 0.01,
                              seed: int = 0, progress: bool = True, log=print) -> dict:
    """`rgpt4d teacher train`: train_teacher with the TrainConfig of `preset` (a preset of
    rgpt4d.train.TRAIN_PRESETS, else "tiny") and these steps / batch size / lr / weight decay /
    seed, warmup 5 %, the device chosen automatically; `config` (a TeacherConfig) replaces the
    preset's teacher. Returns what train_teacher returns."""
    cfg = config or get_preset(preset).teacher
    run = train_config(preset if preset in TRAIN_PRESETS else "tiny", teacher_steps=steps,
                       teacher_batch_size=batch_size, teacher_lr=lr, weight_decay=weight_decay, seed=seed,
                       warmup=0.05, device="auto")
    return train_teacher(run, data_dir, out, progress=progress, teacher_config=cfg, log=log)


@torch.no_grad()
def evaluate_teacher(teacher: Teacher4D, data_dir, split: str = "val", batch_size: int = 4,
                     mean_depth: Optional[float] = None, max_batches: Optional[int] = None) -> dict[str, float]:
    """Depth AbsRel, flow EPE and motion IoU on `split`, each beside its trivial baseline (flow EPE
    also beside the Lucas-Kanade estimate alone, rgpt4d.models.teacher.flow_cue)."""
    teacher.eval()
    loader = video_loader(data_dir, split, batch_size, False)
    if mean_depth is None:
        mean_depth = float(next(iter(loader))["depth"].mean())
    metrics = TeacherMetrics(mean_depth)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        size = teacher.config.image_size
        cue = flow_cue(normalize_frames(batch["frames"], size), teacher.config.flow_cue_window)
        metrics.update(teacher(batch["frames"]), targets_at(batch, size), cue)
    return metrics.result()
