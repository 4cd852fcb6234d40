"""Loader for the real R4D-Bench release.

Layout (PAPER.md): ROOT/test.json, ROOT/videos/<benchmark>/<name>.mp4 (full videos),
ROOT/clipped/<benchmark>/<name>.mp4 (trimmed so every region is visible in the first frame),
ROOT/images/<benchmark>/<id>.png (SoM images). Entries mix types: `id`, `options` and `answer` hold
ints, strings and None, and the answer can be the integer 0; `answer_index` matches them without
confusing 0 with False or None.

Videos are decoded with PyAV (`pip install av`), an optional dependency; torchvision 0.29 no longer
ships video decoding. Frames are sampled uniformly and their timestamps come from the stream's
presentation times, in seconds from the first decoded frame.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from rgpt4d.data.dataset import question_fields

PYAV_HINT = "decoding R4D-Bench videos needs PyAV: install it with `pip install av`"


def _require_av():
    try:
        import av  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError(PYAV_HINT) from e
    return av


def load_release_entries(root: str | Path, file: str = "test.json") -> list[dict[str, Any]]:
    path = Path(root) / file
    if not path.is_file():
        raise FileNotFoundError(f"R4D-Bench root {root}: {file} not found")
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {type(entries).__name__}")
    for i, e in enumerate(entries):
        missing = [k for k in ("id", "task", "question", "options", "answer") if k not in e]
        if missing:
            raise ValueError(f"{path}: entry {i} (id {e.get('id')!r}) lacks {missing}")
    return entries


def resolve_video(root: str | Path, entry: dict[str, Any]) -> Path:
    """clipped/<benchmark>/<name> first, then videos/<benchmark>/<name>, then the paths as written."""
    root = Path(root)
    tried = []
    names = []
    for key in ("video", "source"):
        value = entry.get(key)
        if isinstance(value, str) and value:
            name = PurePosixPath(value).name
            if name not in names:
                names.append(name)
    bench = str(entry.get("benchmark", ""))
    for folder in ("clipped", "videos"):
        for name in names:
            p = root / folder / bench / name
            tried.append(p)
            if p.is_file():
                return p
    for key in ("video", "source"):
        value = entry.get(key)
        if isinstance(value, str) and value:
            p = root / value
            tried.append(p)
            if p.is_file():
                return p
    raise FileNotFoundError(f"no video for entry {entry.get('id')!r}; tried {[str(t) for t in tried]}")


def resolve_som(root: str | Path, entry: dict[str, Any]) -> Path:
    root = Path(root)
    candidates = []
    if isinstance(entry.get("som_image"), str):
        candidates.append(root / entry["som_image"])
    candidates.append(root / "images" / str(entry.get("benchmark", "")) / f"{entry['id']}.png")
    for p in candidates:
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"no SoM image for entry {entry.get('id')!r}; tried {[str(c) for c in candidates]}"
    )


def decode_video(
    path: str | Path, num_frames: int = 16, size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_frames` frames sampled uniformly: uint8 [F, 3, H, W] and timestamps [F] in seconds."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    av = _require_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times = []
        for frame in container.decode(stream):
            times.append(
                frame.time if frame.time is not None else len(times) / float(stream.average_rate or 1)
            )
    if not times:
        raise ValueError(f"{path}: no video frames")
    wanted = np.round(np.linspace(0, len(times) - 1, num_frames)).astype(np.int64)
    keep = set(wanted.tolist())
    frames: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in keep:
                img = frame.to_image()
                if size is not None:
                    img = img.resize((size[1], size[0]), Image.BILINEAR)
                frames[i] = np.asarray(img.convert("RGB"))
    video = np.stack([frames[i] for i in wanted]).transpose(0, 3, 1, 2)
    t = np.asarray([times[i] for i in wanted], dtype=np.float64) - times[0]
    return torch.from_numpy(np.ascontiguousarray(video)), torch.tensor(t, dtype=torch.float32)


class R4DBench(Dataset):
    """The release as a dataset with the same keys as `Synth4DQuestions` (no region boxes: the
    release gives regions only through its SoM images, so `boxes` is empty)."""

    def __init__(
        self,
        root: str | Path,
        num_frames: int = 16,
        size: tuple[int, int] | None = None,
        load_video: bool = True,
        file: str = "test.json",
    ):
        self.root = Path(root)
        self.entries = load_release_entries(self.root, file)
        self.num_frames = num_frames
        self.size = size
        self.load_video = load_video
        if load_video:
            _require_av()  # fail at construction, not in a worker halfway through an epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        item = question_fields(e)
        item["benchmark"] = e.get("benchmark")
        item["boxes"] = torch.zeros(0, 4)
        item["region_ids"] = torch.zeros(0, dtype=torch.int64)
        som = Image.open(resolve_som(self.root, e)).convert("RGB")
        if self.size is not None:
            som = som.resize((self.size[1], self.size[0]), Image.BILINEAR)
        item["som_image"] = torch.from_numpy(np.ascontiguousarray(np.asarray(som).transpose(2, 0, 1)))
        if self.load_video:
            path = resolve_video(self.root, e)
            item["video_path"] = str(path)
            item["frames"], item["timestamps"] = decode_video(path, self.num_frames, self.size)
        return item
