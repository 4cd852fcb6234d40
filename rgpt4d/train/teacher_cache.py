"""The teacher cache: the frozen teacher run once over every video (`rgpt4d teacher cache`), read
back per batch by student training.

`cache_teacher` writes, per video, `<out>/<video_id>.safetensors` with `latent` [T', h, w, C],
`layers` [4, T', h, w, C] (fp16) and the explicit outputs `depth` [T, S, S], `flow` [T, 2, S, S],
`motion` (logits) [T, S, S] and, with a camray head, `camray` [T, 6, S, S], plus `cache_index.json`
(the teacher spec, its config, the split of each video). `load_cached` stacks the entries of a batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rgpt4d.models.teacher import Teacher4D
from rgpt4d.train.teacher import check_frames, video_loader


@torch.no_grad()
def cache_teacher(teacher_dir, data_dir, out, *, splits=("train", "val", "test"), batch_size: int = 4,
                  progress: bool = True) -> int:
    """Write the frozen teacher's latents and explicit outputs per video. Returns videos written.
    `teacher_dir`: anything Teacher4D.load reads (a trained teacher's folder, `l4p:PATH`)."""
    teacher = Teacher4D.load(teacher_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    index = {}
    for split in splits:
        try:
            loader = video_loader(data_dir, split, batch_size, False)
        except ValueError:
            continue
        for batch in tqdm(loader, desc=f"cache {split}", unit="batch", disable=not progress):
            check_frames(teacher.config.num_frames, batch)
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
    items = []
    for vid in video_ids:
        path = Path(cache_dir) / f"{vid}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"teacher cache: no entry for video {vid!r} in {cache_dir} (run `rgpt4d teacher cache`)")
        items.append(load_file(str(path)))
    keys = sorted(items[0]) if keys is None else keys
    return {k: torch.stack([it[k].float() for it in items]) for k in keys}
