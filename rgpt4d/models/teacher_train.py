"""Training, evaluation and caching of the 4D teacher (`rgpt4d teacher train|cache`).

train_teacher: supervised on the synthetic ground truth (depth, backward flow, motion), AdamW, a
cosine schedule; reports held-out quality beside trivial baselines; saves the frozen teacher.
cache_teacher: runs the frozen teacher once over every video and writes, per video,
`<out>/<video_id>.safetensors` with `latent` [T', h, w, C], `layers` [4, T', h, w, C] (fp16) and the
explicit outputs `depth` [T, S, S], `flow` [T, 2, S, S], `motion` (logits) [T, S, S] and, with a
camray head, `camray` [T, 6, S, S]; every student
run reads them instead of running the teacher (`load_cached`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from rgpt4d.models.configs import TeacherConfig, get_preset
from rgpt4d.models.teacher import Teacher4D, TeacherMetrics, flow_cue, normalize_frames, targets_at

FIELDS = ("rgb", "depth", "flow", "motion", "camray")


def _loader(data_dir, split, batch_size, shuffle, seed=0):
    from rgpt4d.data import Synth4DVideos, collate

    ds = Synth4DVideos(data_dir, split, fields=FIELDS)
    if len(ds) == 0:
        raise ValueError(f"data: no {split} videos in {data_dir}")
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=g)


def _check_frames(cfg: TeacherConfig, batch) -> None:
    if batch["frames"].shape[1] != cfg.num_frames:
        raise ValueError(f"data: videos have {batch['frames'].shape[1]} frames but the teacher takes "
                         f"{cfg.num_frames}; make the data with --frames {cfg.num_frames}")


@torch.no_grad()
def evaluate_teacher(teacher: Teacher4D, data_dir, split: str = "val", batch_size: int = 4,
                     mean_depth: Optional[float] = None, max_batches: Optional[int] = None) -> dict[str, float]:
    """Depth AbsRel, flow EPE and motion IoU on `split`, each beside its trivial baseline (flow EPE
    also beside the Lucas-Kanade estimate alone, rgpt4d.models.teacher.flow_cue)."""
    teacher.eval()
    loader = _loader(data_dir, split, batch_size, False)
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


def train_teacher(data_dir, out, *, preset: str = "tiny", config: Optional[TeacherConfig] = None,
                  steps: int = 200, batch_size: int = 4, lr: float = 1e-3, weight_decay: float = 0.01,
                  seed: int = 0, progress: bool = True, log=print) -> dict:
    """Train the teacher on the train split, evaluate on val, save it frozen to `out`.

    A thin front of rgpt4d.train.train_teacher (the shared training loop: checkpoints in
    `<out>/checkpoints`, `<out>/metrics.jsonl`). Returns {"steps", "seconds", "loss" (last), the
    loss terms, "metrics" (held-out, with baselines)}; also written to `<out>/teacher_metrics.json`.
    """
    from rgpt4d.train import train_config
    from rgpt4d.train import train_teacher as _train

    cfg = config or get_preset(preset).teacher
    run = train_config(preset if preset in ("smoke", "tiny", "small", "paper") else "tiny", teacher_steps=steps,
                       teacher_batch_size=batch_size, teacher_lr=lr, weight_decay=weight_decay, seed=seed,
                       warmup=0.05, device="auto")
    return _train(run, data_dir, out, progress=progress, teacher_config=cfg, log=log)


@torch.no_grad()
def cache_teacher(teacher_dir, data_dir, out, *, splits=("train", "val", "test"), batch_size: int = 4,
                  progress: bool = True) -> int:
    """Write the frozen teacher's latents and explicit outputs per video. Returns videos written."""
    from safetensors.torch import save_file

    teacher = Teacher4D.load(teacher_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    index = {}
    for split in splits:
        try:
            loader = _loader(data_dir, split, batch_size, False)
        except ValueError:
            continue
        it = loader
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(loader, desc=f"cache {split}", unit="batch")
        for batch in it:
            _check_frames(teacher.config, batch)
            o = teacher(batch["frames"])
            for i, vid in enumerate(batch["video_id"]):
                tensors = {
                    "latent": o.latent[i].half(), "layers": torch.stack([l[i] for l in o.layers]).half(),
                    **{k: getattr(o, k)[i].half() for k in ("depth", "flow", "motion", "camray")
                       if getattr(o, k) is not None},
                }
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{vid}.safetensors"))
                index[vid] = split
                written += 1
    (out / "cache_index.json").write_text(json.dumps({"teacher": str(teacher_dir), "config": teacher.config.to_dict(),
                                                      "videos": index}, indent=2))
    return written


def load_cached(cache_dir, video_ids, keys=None) -> dict[str, torch.Tensor]:
    """Stack the cached teacher outputs of `video_ids` (float32): {key: [B, ...]}; `keys` None: every
    output the cache holds (latent, layers and the teacher's explicit heads)."""
    from safetensors.torch import load_file

    items = []
    for vid in video_ids:
        path = Path(cache_dir) / f"{vid}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"teacher cache: no entry for video {vid!r} in {cache_dir} (run `rgpt4d teacher cache`)")
        items.append(load_file(str(path)))
    keys = sorted(items[0]) if keys is None else keys
    return {k: torch.stack([it[k].float() for it in items]) for k in keys}
