"""`rgpt4d data make`: render a synthetic 4D dataset with R4D-style questions.

Output layout (DIR):
    manifest.json          format, schema_version, generator arguments, arrays, shards, videos
    shards/shard-NNNNN.bin raw arrays of `shard_size` consecutive videos (see storage.py)
    images/<video>.png     the SoM image of each video (first frame with numbered boxes)
    train.json val.json test.json   questions in the R4D-Bench schema, split by video

Every video i is drawn from its own generator seeded by (seed, i), and shard k always holds videos
[k * shard_size, (k + 1) * shard_size), so the output does not depend on the number of workers or on
the order in which they finish: the same arguments give byte-identical files.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from rgpt4d.data.questions import Candidate, assemble_questions, candidates_for_video, mark_objects
from rgpt4d.data.render import Render, render
from rgpt4d.data.schema import DATASET_FORMAT, SCHEMA_VERSION
from rgpt4d.data.som import draw_som
from rgpt4d.data.storage import ARRAYS, MANIFEST, ShardWriter, dump_json, round_floats
from rgpt4d.data.world import Scene, WorldConfig, sample_scene

SPLITS = ("train", "val", "test")


@dataclass
class MakeConfig:
    out: str
    num_videos: int
    seed: int = 0
    frames: int = 16
    size: int = 64
    workers: int = 1
    shard_size: int = 32
    min_objects: int = 1
    max_objects: int = 6
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        def bad(arg: str, value: Any, need: str) -> None:
            raise ValueError(f"--{arg.replace('_', '-')} must be {need}, got {value!r}")

        if not isinstance(self.num_videos, int) or self.num_videos < 1:
            bad("num_videos", self.num_videos, "an integer >= 1")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", self.seed, "an integer >= 0")
        if not isinstance(self.frames, int) or not 2 <= self.frames <= 256:
            bad("frames", self.frames, "an integer in [2, 256]")
        if not isinstance(self.size, int) or not 16 <= self.size <= 1024:
            bad("size", self.size, "an integer in [16, 1024]")
        if not isinstance(self.workers, int) or self.workers < 1:
            bad("workers", self.workers, "an integer >= 1")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            bad("shard_size", self.shard_size, "an integer >= 1")
        if not 1 <= self.min_objects <= self.max_objects <= 10:
            bad(
                "max_objects",
                (self.min_objects, self.max_objects),
                "with 1 <= min_objects <= max_objects <= 10",
            )
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 0.5:
                bad(name, v, "in [0, 0.5)")

    def world(self) -> WorldConfig:
        return WorldConfig(
            frames=self.frames,
            height=self.size,
            width=self.size,
            min_objects=self.min_objects,
            max_objects=self.max_objects,
        )


def video_id(index: int) -> str:
    return f"v{index:06d}"


def assign_splits(
    num_videos: int, seed: int, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> list[str]:
    """Split name per video index: a seeded permutation, at least one val and test video when possible."""
    n_val = int(round(val_fraction * num_videos))
    n_test = int(round(test_fraction * num_videos))
    if num_videos >= 3:
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
    order = np.random.default_rng([seed, 0x5B1D]).permutation(num_videos)
    splits = ["train"] * num_videos
    for i in order[:n_test]:
        splits[int(i)] = "test"
    for i in order[n_test : n_test + n_val]:
        splits[int(i)] = "val"
    return splits


@dataclass
class Video:
    """One generated video: the scene, its render (or first frame only), marks and candidates."""

    index: int
    scene: Scene
    render: Render
    numbers: list[int | None]
    candidates: list[Candidate]


def make_video(index: int, seed: int, cfg: WorldConfig, first_frame_only: bool = False) -> Video:
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, cfg)
    r = render(scene, [0] if first_frame_only else None)
    numbers = mark_objects(scene, r, rng)
    cands = candidates_for_video(video_id(index), scene, numbers, rng)
    return Video(index, scene, r, numbers, cands)


def simulate_candidates(
    num_videos: int, seed: int, cfg: WorldConfig | None = None, start: int = 0
) -> list[Candidate]:
    """The candidates `make` would produce for videos [start, start + num_videos), rendering only the
    first frame (which is all the questions depend on). Used for the text-only baseline check."""
    cfg = cfg or WorldConfig()
    out: list[Candidate] = []
    for i in range(start, start + num_videos):
        out.extend(make_video(i, seed, cfg, first_frame_only=True).candidates)
    return out


def video_metadata(v: Video) -> dict[str, Any]:
    """The 3D metadata of a video for the manifest (positions, velocities, sizes, yaw per frame)."""
    s, ts = v.scene, v.scene.timestamps
    cam = s.camera
    f = cam.focal(s.width)
    objects = []
    for k, o in enumerate(s.objects):
        pos, yaw = o.pose(ts)
        vel = o.velocity(ts)
        objects.append(
            {
                "index": k,
                "number": v.numbers[k],
                "name": o.name,
                "shape": o.shape,
                "size": list(o.size),
                "color": o.color_name,
                "motion": asdict(o.motion),
                "position": [[p[0], p[1], o.centre_height] for p in pos.tolist()],
                "velocity": [[u[0], u[1], 0.0] for u in vel.tolist()],
                "yaw": yaw.tolist(),
            }
        )
    regions = [
        {"obj": v.numbers[k], "box": v.render.boxes[0, k].tolist()}
        for k in range(len(s.objects))
        if v.numbers[k] is not None
    ]
    regions.sort(key=lambda r: r["obj"])
    return {
        "id": video_id(v.index),
        "fps": s.fps,
        "native_frames": s.native_frames,
        "timestamps": ts.tolist(),
        "duration": s.duration,
        "height": s.height,
        "width": s.width,
        "camera": {
            "height": cam.height,
            "pitch": cam.pitch,
            "hfov": cam.hfov,
            "velocity": list(cam.velocity),
            "yaw_rate": cam.yaw_rate,
            "intrinsics": [f, f, s.width / 2, s.height / 2],
            "centres": cam.centres(ts).tolist(),
            "rotations": cam.rotations(ts).tolist(),
        },
        "objects": objects,
        "regions": regions,
    }


def _video_arrays(r: Render) -> dict[str, np.ndarray]:
    return {
        "rgb": r.rgb,
        "depth": r.depth,
        "flow": r.flow,
        "instance": r.instance,
        "motion": r.motion.astype(np.uint8),
        "boxes": r.boxes,
        "visible_pixels": r.visible_pixels,
    }


def _make_shard(task: tuple[int, MakeConfig]) -> tuple[int, dict, list[dict], list[Candidate]]:
    shard, cfg = task
    out = Path(cfg.out)
    world = cfg.world()
    first = shard * cfg.shard_size
    last = min(first + cfg.shard_size, cfg.num_videos)
    rel = f"shards/shard-{shard:05d}.bin"
    writer = ShardWriter(out / rel)
    metas, cands = [], []
    for i in range(first, last):
        v = make_video(i, cfg.seed, world)
        meta = video_metadata(v)
        meta["shard"] = rel
        meta["arrays"] = writer.add(_video_arrays(v.render))
        boxes = {
            v.numbers[k]: tuple(v.render.boxes[0, k])
            for k in range(len(v.numbers))
            if v.numbers[k] is not None
        }
        Image.fromarray(draw_som(v.render.rgb[0], boxes)).save(
            out / "images" / f"{meta['id']}.png", optimize=False
        )
        metas.append(meta)
        cands.extend(v.candidates)
    record = {"path": rel, "videos": [m["id"] for m in metas], **writer.close()}
    return shard, record, metas, cands


def make_dataset(cfg: MakeConfig) -> dict[str, Any]:
    """Generate the dataset; returns a summary (counts, seconds, videos per second)."""
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
        if not (out / MANIFEST).is_file():
            raise FileExistsError(f"--out {out} is not a dataset made by this tool; refusing to overwrite it")
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(parents=True, exist_ok=True)

    num_shards = math.ceil(cfg.num_videos / cfg.shard_size)
    tasks = [(k, cfg) for k in range(num_shards)]
    results: list[tuple[int, dict, list[dict], list[Candidate]]] = []
    start = time.perf_counter()
    bar = None
    if cfg.progress:
        bar = tqdm(total=cfg.num_videos, unit="video", desc="rendering")
    workers = min(cfg.workers, num_shards)
    if workers <= 1:
        for t in tasks:
            results.append(_make_shard(t))
            if bar:
                bar.update(len(results[-1][2]))
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            for res in pool.imap_unordered(_make_shard, tasks):
                results.append(res)
                if bar:
                    bar.update(len(res[2]))
    if bar:
        bar.close()
    render_seconds = time.perf_counter() - start
    results.sort(key=lambda r: r[0])

    splits = assign_splits(cfg.num_videos, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    videos, shards, cands = [], [], []
    for _, record, metas, cs in results:
        shards.append(record)
        videos.extend(metas)
        cands.extend(cs)
    for meta in videos:
        meta["split"] = splits[int(meta["id"][1:])]
    info = {
        m["id"]: {
            "fps": m["fps"],
            "timestamps": round_floats(m["timestamps"]),
            "regions": round_floats(m["regions"]),
        }
        for m in videos
    }
    split_of = {m["id"]: m["split"] for m in videos}
    counts = {}
    for split in SPLITS:
        entries = assemble_questions(
            [c for c in cands if split_of[c.video_id] == split], cfg.seed, split, info
        )
        dump_json(out / f"{split}.json", entries)
        counts[split] = {"videos": sum(1 for s in splits if s == split), "questions": len(entries)}

    generator = {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers", "overwrite", "progress")}
    manifest = {
        "format": DATASET_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "generator": generator,
        "splits": counts,
        "arrays": {name: {"dtype": d, "description": desc} for name, (d, desc) in ARRAYS.items()},
        "shards": shards,
        "videos": round_floats(videos),
    }
    dump_json(out / MANIFEST, manifest, compact=True)
    total = time.perf_counter() - start
    return {
        "out": str(out),
        "splits": counts,
        "seconds": total,
        "render_seconds": render_seconds,
        "videos_per_second": cfg.num_videos / total,
    }


if __name__ == "__main__":  # pragma: no cover - convenience
    import sys

    print(make_dataset(MakeConfig(out=sys.argv[1], num_videos=int(sys.argv[2]), workers=os.cpu_count() or 1)))
