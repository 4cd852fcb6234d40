"""Torch datasets over `rgpt4d data make` output, and a collate function for mixed batches.

`Synth4DVideos` yields one video with its ground-truth maps (for the 4D teacher);
`Synth4DQuestions` yields one question with its video, SoM image and region boxes (for the student
and for evaluation). `R4DBench` (r4d_bench.py) yields the same keys from the real release.

`collate` pads along time and along regions, so videos of different lengths and frame rates and
questions with different numbers of marked regions share a batch: `frame_mask` [B, F] and
`region_mask` [B, R] say what is real. Timestamps are seconds, so a batch mixes frame rates freely.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from rgpt4d.data.render import plucker_rays
from rgpt4d.data.schema import answer_index, category_of, format_prompt, option_text
from rgpt4d.data.storage import ARRAYS, load_manifest, read_array

# rgb, depth, flow, instance, motion, boxes, visible_pixels (stored arrays), and camray: the per-frame
# Plücker camera rays [F, 6, H, W] in the first frame's camera coordinates, from the manifest's camera
# (rgpt4d.data.render.plucker_rays)
VIDEO_FIELDS = (*ARRAYS, "camray")
SPLITS = ("train", "val", "test")

# keys whose first dimension is time (padded by collate), with the padding value
TIME_KEYS = {
    "frames": 0,
    "timestamps": 0.0,
    "depth": 0.0,
    "flow": 0.0,
    "camray": 0.0,
    "instance": 0,
    "motion": 0,
    "object_boxes": float("nan"),
    "visible_pixels": 0,
}
# keys whose first dimension is the region (padded by collate)
REGION_KEYS = {"boxes": 0.0, "region_ids": 0}


def _check_fields(fields: Sequence[str]) -> tuple[str, ...]:
    fields = tuple(fields)
    bad = [f for f in fields if f not in VIDEO_FIELDS]
    if bad:
        raise ValueError(f"fields: unknown {bad}; choose from {list(VIDEO_FIELDS)}")
    return fields


def _video_tensors(root: Path, meta: dict[str, Any], fields: Sequence[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"timestamps": torch.tensor(meta["timestamps"], dtype=torch.float32)}
    shard = root / meta["shard"]
    for name in fields:
        if name == "camray":
            cam = meta["camera"]
            out[name] = torch.from_numpy(plucker_rays(cam["intrinsics"], cam["centres"], cam["rotations"],
                                                      meta["height"], meta["width"]))
            continue
        arr = read_array(shard, meta["arrays"][name])
        if name == "rgb":
            out["frames"] = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
        elif name in ("depth", "flow"):
            out[name] = torch.from_numpy(arr.astype(np.float32))
        elif name == "motion":
            out[name] = torch.from_numpy(arr.astype(bool))
        elif name == "boxes":
            out["object_boxes"] = torch.from_numpy(arr.copy())
        elif name == "instance":
            out[name] = torch.from_numpy(arr.astype(np.int64))
        else:
            out[name] = torch.from_numpy(arr.copy())
    return out


class Synth4DVideos(Dataset):
    """One item per video: frames [F, 3, H, W] uint8, timestamps [F] (s) and the chosen maps."""

    def __init__(self, root: str | Path, split: str | None = None, fields: Sequence[str] = VIDEO_FIELDS):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        self.fields = _check_fields(fields)
        self.videos = [v for v in self.manifest["videos"] if split is None or v["split"] == split]

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict[str, Any]:
        meta = self.videos[i]
        item: dict[str, Any] = {"video_id": meta["id"], "fps": meta["fps"]}
        item.update(_video_tensors(self.root, meta, self.fields))
        return item


class Synth4DQuestions(Dataset):
    """One item per question of a split, with its video, SoM image and first-frame region boxes."""

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        fields: Sequence[str] = ("rgb",),
        load_video: bool = True,
    ):
        self.root = Path(root)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.manifest = load_manifest(self.root)
        self.fields = _check_fields(fields)
        self.load_video = load_video
        path = self.root / f"{split}.json"
        self.entries = json.loads(path.read_text(encoding="utf-8"))
        self.videos = {v["id"]: v for v in self.manifest["videos"]}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        regions = e.get("regions", [])
        item: dict[str, Any] = question_fields(e)
        item["boxes"] = torch.tensor([r["box"] for r in regions], dtype=torch.float32).reshape(-1, 4)
        item["region_ids"] = torch.tensor([r["obj"] for r in regions], dtype=torch.int64)
        som = np.asarray(Image.open(self.root / e["som_image"]).convert("RGB"))
        item["som_image"] = torch.from_numpy(np.ascontiguousarray(som.transpose(2, 0, 1)))
        if self.load_video:
            item.update(_video_tensors(self.root, self.videos[e["video"]], self.fields))
        else:
            item["timestamps"] = torch.tensor(e["timestamps"], dtype=torch.float32)
        return item


class QuestionsByVideo(Dataset):
    """The questions of a `Synth4DQuestions` grouped by video, for multi-turn training: one item per
    chunk of at most `max_questions` questions of one video (each question is in exactly one chunk;
    a video's questions are split into chunks of near-equal size, in an order fixed by `seed` and the
    video id). The video is loaded once per item, with the keys of a question item, and the chunk's
    questions as lists: `turn_prompts`, `turn_options` (option texts) and `turn_answers` (indices).
    The questions of one video must mark the same regions (`<obj_N>` numbering is per video)."""

    def __init__(self, questions: Synth4DQuestions, max_questions: int, seed: int = 0):
        if not isinstance(max_questions, int) or isinstance(max_questions, bool) or max_questions < 1:
            raise ValueError(f"max_questions: must be an integer >= 1, got {max_questions!r}")
        self.questions, self.max_questions = questions, max_questions
        self.root, self.entries, self.videos = questions.root, questions.entries, questions.videos
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(questions.entries):
            groups.setdefault(e["video"], []).append(i)
        self.chunks: list[list[int]] = []
        for vid, idx in groups.items():
            regions = questions.entries[idx[0]].get("regions", [])
            for j in idx[1:]:
                if questions.entries[j].get("regions", []) != regions:
                    raise ValueError(f"questions: {questions.entries[j]['id']} marks other regions than "
                                     f"{questions.entries[idx[0]]['id']} of the same video {vid}")
            random.Random(zlib.crc32(f"{seed}:{vid}".encode())).shuffle(idx)
            n = -(-len(idx) // max_questions)
            self.chunks += [idx[k::n] for k in range(n)]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        idx = self.chunks[i]
        item = self.questions[idx[0]]
        texts = [question_fields(self.entries[j]) for j in idx]
        item["turn_prompts"] = [t["prompt"] for t in texts]
        item["turn_options"] = [t["options"] for t in texts]
        item["turn_answers"] = [t["answer_index"] for t in texts]
        return item


def question_fields(e: dict[str, Any]) -> dict[str, Any]:
    """The text side of a question item, shared by the synthetic and the release datasets."""
    options = list(e["options"])
    return {
        "id": str(e["id"]),
        "category": category_of(e["task"]),
        "task": e["task"],
        "question": e["question"],
        "question_raw": e.get("question_raw", e["question"]),
        "options": [option_text(v) for v in options],
        "answer_index": answer_index(options, e["answer"], entry_id=e["id"]),
        "prompt": format_prompt(e["question"], options),
        "video_id": str(e.get("video", "")),
    }


# per-object arrays: the object count differs between videos, so they are padded along it too
PAD_ALL_DIMS = {"object_boxes", "visible_pixels"}


def _pad_stack(values: list[torch.Tensor], length: int, fill: float, key: str) -> torch.Tensor:
    rest = values[0].shape[1:]
    if key in PAD_ALL_DIMS:
        rest = torch.Size(max(v.shape[d] for v in values) for d in range(1, values[0].dim()))
        out = torch.full((len(values), length, *rest), fill, dtype=values[0].dtype)
        for i, v in enumerate(values):
            out[(i,) + tuple(slice(0, n) for n in v.shape)] = v
        return out
    for v in values:
        if v.shape[1:] != rest:
            raise ValueError(
                f"collate: '{key}' has shapes {[tuple(x.shape) for x in values]}; "
                "all but the first dimension must match (resize videos to one size)"
            )
    out = (
        torch.full((len(values), length, *rest), fill, dtype=values[0].dtype)
        if values[0].is_floating_point()
        else torch.full((len(values), length, *rest), int(fill), dtype=values[0].dtype)
    )
    for i, v in enumerate(values):
        out[i, : v.shape[0]] = v
    return out


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items from any of the datasets here: pads time and regions, stacks the rest."""
    if not batch:
        raise ValueError("collate: empty batch")
    out: dict[str, Any] = {}
    keys = batch[0].keys()
    for item in batch[1:]:
        if item.keys() != keys:
            raise ValueError(f"collate: items have different keys: {sorted(keys)} vs {sorted(item.keys())}")
    if "timestamps" in keys:
        lengths = torch.tensor([b["timestamps"].shape[0] for b in batch])
        T = int(lengths.max())
        out["frame_mask"] = torch.arange(T)[None, :] < lengths[:, None]
    if "boxes" in keys:
        counts = torch.tensor([b["boxes"].shape[0] for b in batch])
        R = int(counts.max()) if len(counts) else 0
        out["region_mask"] = torch.arange(R)[None, :] < counts[:, None]
    for key in keys:
        values = [b[key] for b in batch]
        if key in TIME_KEYS:
            out[key] = _pad_stack(values, T, TIME_KEYS[key], key)
        elif key in REGION_KEYS:
            out[key] = _pad_stack(values, R, REGION_KEYS[key], key)
        elif isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"collate: '{key}' has different shapes {sorted(shapes)}; resize to one size"
                )
            out[key] = torch.stack(values)
        elif key == "answer_index":
            out[key] = torch.tensor(values, dtype=torch.int64)
        else:
            out[key] = values
    return out
