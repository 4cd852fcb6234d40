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
from rgpt4d.data.evaluate import ReleaseError, read_questions

PYAV_HINT = "decoding R4D-Bench videos needs PyAV: install it with `pip install av`"


def require_av():
    try:
        import av  # optional: av (the video extra)
    except ImportError as e:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError(PYAV_HINT) from e
    return av


def load_release_entries(root: str | Path, file: str = "test.json", skip_bad: bool = False
                         ) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The release's entries, checked (rgpt4d.data.evaluate.check_entries: malformed JSON, a missing
    field, an answer not among its options are ReleaseErrors naming the file and the entry id).
    With `skip_bad`: (good entries, bad ones as {"id", "index", "file", "reason"})."""
    path = Path(root) / file
    if not path.is_file():
        raise FileNotFoundError(f"R4D-Bench root {root}: {file} not found")
    good, bad = read_questions(path, skip_bad)
    return (good, bad) if skip_bad else good


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
    av = require_av()
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


_SAME = object()


def entry_media(root: str | Path, entry: dict[str, Any], num_frames: int = 16, size: tuple[int, int] | None = None,
                video: bool = True, som_size: Any = _SAME) -> dict[str, Any]:
    """An entry's SoM image (uint8 [3, H, W], resized to `som_size` (H, W): by default `size`, None
    keeps the file's) and, with `video`, its frames (resized to `size`) and timestamps
    (decode_video). A missing, unreadable or undecodable file is a ReleaseError naming the file and
    the entry id."""
    som_size = size if som_size is _SAME else som_size
    eid = entry.get("id")
    out: dict[str, Any] = {}
    try:
        som_path = resolve_som(root, entry)
    except FileNotFoundError as e:
        raise ReleaseError(str(e)) from None
    try:
        with Image.open(som_path) as im:
            som = im.convert("RGB")
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ReleaseError(f"{som_path}: entry {eid!r}: cannot read the SoM image ({e})") from None
    if som_size is not None:
        som = som.resize((som_size[1], som_size[0]), Image.BILINEAR)
    out["som_image"] = torch.from_numpy(np.ascontiguousarray(np.asarray(som).transpose(2, 0, 1)))
    out["som_path"] = str(som_path)
    if video:
        try:
            path = resolve_video(root, entry)
        except FileNotFoundError as e:
            raise ReleaseError(str(e)) from None
        try:
            out["frames"], out["timestamps"] = decode_video(path, num_frames, size)
        except ImportError:
            raise
        except Exception as e:  # PyAV raises its own error types (av.error.InvalidDataError, ...)
            raise ReleaseError(f"{path}: entry {eid!r}: cannot decode the video ({type(e).__name__}: {e})") from None
        out["video_path"] = str(path)
    return out


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
            require_av()  # fail at construction, not in a worker halfway through an epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        item = question_fields(e)
        item["benchmark"] = e.get("benchmark")
        item["boxes"] = torch.zeros(0, 4)
        item["region_ids"] = torch.zeros(0, dtype=torch.int64)
        media = entry_media(self.root, e, self.num_frames, self.size, video=self.load_video)
        item["som_image"] = media["som_image"]
        if self.load_video:
            item["video_path"], item["frames"], item["timestamps"] = (media["video_path"], media["frames"],
                                                                      media["timestamps"])
        return item
