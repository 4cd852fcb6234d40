"""`rgpt4d data show` (a contact sheet of one video) and `rgpt4d data stats` (what a dataset holds)."""

from __future__ import annotations

import collections
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rgpt4d.data.schema import CATEGORIES, LETTERS, answer_index, category_of, option_text
from rgpt4d.data.storage import load_manifest, read_array

FPS_BUCKETS = ((2, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30.01))


def flow_to_rgb(flow: np.ndarray, max_mag: float | None = None) -> np.ndarray:
    """Colour-code flow [H, W, 2]: hue = direction, brightness = magnitude."""
    import matplotlib.colors as mcolors  # start-up: matplotlib, ~0.8 s to import

    mag = np.hypot(flow[..., 0], flow[..., 1])
    scale = max_mag if max_mag else max(float(mag.max()), 1e-6)
    hsv = np.stack(
        [
            (np.arctan2(flow[..., 1], flow[..., 0]) / (2 * np.pi)) % 1.0,
            np.ones_like(mag),
            np.clip(mag / scale, 0, 1),
        ],
        -1,
    )
    return mcolors.hsv_to_rgb(hsv)


def save_figure(fig, out: str | Path) -> Path:
    """tight_layout, write the PNG (creating its folder), close the figure; returns the path."""
    import matplotlib.pyplot as plt  # start-up: matplotlib, ~0.8 s to import

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _load_questions(root: Path) -> list[dict[str, Any]]:
    out = []
    for split in ("train", "val", "test"):
        p = root / f"{split}.json"
        if p.is_file():
            for e in json.loads(p.read_text(encoding="utf-8")):
                e["_split"] = split
                out.append(e)
    return out


def show_sample(root: str | Path, index: int, out: str | Path, frames: int = 6) -> Path:
    """Write a PNG contact sheet of video `index`: frames with boxes, depth, flow, motion and
    instance masks, the SoM image, and the video's questions with the answers marked."""
    import matplotlib  # start-up: matplotlib, ~0.8 s to import

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    root = Path(root)
    manifest = load_manifest(root)
    videos = manifest["videos"]
    if not 0 <= index < len(videos):
        raise ValueError(f"--index must be in [0, {len(videos)}), got {index}")
    meta = videos[index]
    shard = root / meta["shard"]
    arr = {
        k: read_array(shard, meta["arrays"][k])
        for k in ("rgb", "depth", "flow", "instance", "motion", "boxes")
    }
    F = arr["rgb"].shape[0]
    cols = np.unique(np.round(np.linspace(0, F - 1, min(frames, F))).astype(int))
    rows = ["rgb + boxes", "depth (m)", "backward flow", "motion mask", "instances"]
    numbers = {o["index"]: o["number"] for o in meta["objects"]}
    questions = [e for e in _load_questions(root) if e["video"] == meta["id"]]

    text_rows = max(0.6, 0.075 * 2 * len(questions))  # in units of one 2-inch image row
    fig = plt.figure(figsize=(2.0 * len(cols) + 4.5, 2.0 * (len(rows) + text_rows) + 0.4))
    gs = fig.add_gridspec(len(rows) + 1, len(cols) + 2, height_ratios=[1] * len(rows) + [text_rows])
    max_flow = float(np.abs(arr["flow"]).max()) or 1.0
    dmax = float(np.percentile(arr["depth"], 99))
    for c, t in enumerate(cols):
        panels = [
            arr["rgb"][t],
            arr["depth"][t].astype(np.float32),
            flow_to_rgb(arr["flow"][t].astype(np.float32), max_flow),
            arr["motion"][t],
            arr["instance"][t],
        ]
        for r, img in enumerate(panels):
            ax = fig.add_subplot(gs[r, c])
            if r == 1:
                ax.imshow(img, cmap="viridis", vmin=0, vmax=dmax)
            elif r in (3, 4):
                ax.imshow(
                    img,
                    cmap="gray" if r == 3 else "tab10",
                    vmin=0,
                    vmax=1 if r == 3 else 9,
                    interpolation="nearest",
                )
            else:
                ax.imshow(img, interpolation="nearest")
            if r == 0:
                ax.set_title(f"t = {meta['timestamps'][t]:.2f} s", fontsize=8)
                for k, box in enumerate(arr["boxes"][t]):
                    if np.isfinite(box).all():
                        ax.add_patch(
                            patches.Rectangle(
                                (box[0] - 0.5, box[1] - 0.5),
                                box[2] - box[0],
                                box[3] - box[1],
                                fill=False,
                                lw=0.8,
                                color="yellow" if numbers[k] else "gray",
                            )
                        )
            if c == 0:
                ax.set_ylabel(rows[r], fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    ax = fig.add_subplot(gs[0:3, len(cols) :])
    ax.imshow(np.asarray(Image.open(root / "images" / f"{meta['id']}.png")), interpolation="nearest")
    ax.set_title("SoM image (first frame)", fontsize=9)
    ax.axis("off")
    ax = fig.add_subplot(gs[3:5, len(cols) :])
    ax.axis("off")
    cam = meta["camera"]
    info = [
        f"{meta['id']} ({meta['split']})",
        f"fps {meta['fps']}, {F} of {meta['native_frames']} frames, {meta['duration']:.2f} s",
        f"camera: v = ({cam['velocity'][0]:.2f}, {cam['velocity'][1]:.2f}) m/s, "
        f"pan {np.degrees(cam['yaw_rate']):.1f} deg/s",
    ] + [f"<obj_{o['number']}> {o['name']}: {o['motion']['kind']}" for o in meta["objects"] if o["number"]]
    ax.text(0, 1, "\n".join(info), va="top", fontsize=7, family="monospace")
    ax = fig.add_subplot(gs[len(rows), :])
    ax.axis("off")
    lines = []
    for e in questions:
        k = answer_index(e["options"], e["answer"], entry_id=e["id"])
        opts = "  ".join(
            ("[x] " if i == k else "[ ] ") + f"({LETTERS[i]}) {option_text(o)}"
            for i, o in enumerate(e["options"])
        )
        lines.append(f"{category_of(e['task'])}: " + textwrap.shorten(e["question"], 120))
        lines.append("     " + opts)
    ax.text(
        0,
        1,
        "\n".join(lines) if lines else "(no questions kept for this video)",
        va="top",
        fontsize=7,
        family="monospace",
    )
    return save_figure(fig, out)


def dataset_stats(root: str | Path) -> dict[str, Any]:
    """Counts per split, category, template, answer position, option count and frame rate."""
    root = Path(root)
    manifest = load_manifest(root)
    questions = _load_questions(root)
    per_split = collections.Counter(e["_split"] for e in questions)
    per_cat = {
        s: collections.Counter(category_of(e["task"]) for e in questions if e["_split"] == s)
        for s in per_split
    }
    positions: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in questions:
        letter = LETTERS[answer_index(e["options"], e["answer"], entry_id=e["id"])]
        positions[category_of(e["task"])][letter] += 1
        positions["All"][letter] += 1
    fps = collections.Counter()
    for v in manifest["videos"]:
        for lo, hi in FPS_BUCKETS:
            if lo <= v["fps"] < hi:
                fps[f"{lo}-{int(hi)}"] += 1
    durations = [v["duration"] for v in manifest["videos"]]
    return {
        "videos": len(manifest["videos"]),
        "questions": dict(per_split),
        "per_category": {s: {c: per_cat[s][c] for c in CATEGORIES} for s in per_cat},
        "per_template": dict(sorted(collections.Counter(e.get("template", "?") for e in questions).items())),
        "answer_positions": {k: dict(sorted(v.items())) for k, v in positions.items()},
        "options": dict(sorted(collections.Counter(len(e["options"]) for e in questions).items())),
        "fps": dict(fps),
        "duration_seconds": {
            "min": min(durations),
            "median": float(np.median(durations)),
            "max": max(durations),
        },
        "generator": manifest["generator"],
    }


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"videos: {stats['videos']}   questions: {stats['questions']}"]
    lines.append("per category: " + "  ".join(f"{c}" for c in CATEGORIES))
    for split, counts in stats["per_category"].items():
        lines.append(f"  {split:5s} " + "  ".join(f"{c}={counts[c]}" for c in CATEGORIES))
    lines.append("answer positions (all splits):")
    for key, counts in stats["answer_positions"].items():
        lines.append(f"  {key:4s} " + "  ".join(f"{k}={v}" for k, v in counts.items()))
    lines.append("options per question: " + "  ".join(f"{k}: {v}" for k, v in stats["options"].items()))
    lines.append(
        "videos per fps: "
        + "  ".join(
            f"{k}: {v}" for k, v in sorted(stats["fps"].items(), key=lambda kv: float(kv[0].split("-")[0]))
        )
    )
    d = stats["duration_seconds"]
    lines.append(f"duration (s): min {d['min']:.2f}  median {d['median']:.2f}  max {d['max']:.2f}")
    lines.append("per template: " + ", ".join(f"{k} {v}" for k, v in stats["per_template"].items()))
    return "\n".join(lines)
