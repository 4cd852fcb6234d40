"""Reports of the demo and the study: result tables, loss curves, the teacher's quality and a figure
of its predictions. Figures are PNGs drawn with matplotlib's Agg backend (no display needed).

    chance_scores(questions)                       expected accuracy of a uniform random letter
    scores_table({"SFT": scores, ...})             the 12-column markdown table (mean, or mean ± std)
    plot_loss_curves({"sft": "runs/x/metrics.jsonl", ...}, "curves.png")
    plot_teacher_predictions(teacher_dir, data_dir, "test", "teacher.png")
    teacher_quality_table(metrics)                 each held-out metric beside its trivial baseline
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from rgpt4d.data import Synth4DVideos
from rgpt4d.data.schema import REPORT_COLUMNS, STATIC_CATEGORIES, category_of
from rgpt4d.data.show import flow_to_rgb as flow_hw2_to_rgb, save_figure
from rgpt4d.models.teacher import Teacher4D, targets_at


def _agg():
    # start-up: ~0.8 s (python -X importtime -c "import matplotlib.pyplot"); only the figures need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def chance_scores(questions: Iterable[dict]) -> dict[str, Optional[float]]:
    """Per report column, the expected accuracy (percent) of picking a letter uniformly at random:
    the mean of 1 / (number of options) over the column's questions."""
    groups: dict[str, list[float]] = {c: [] for c in REPORT_COLUMNS}
    for q in questions:
        n = len(q["options"])
        if n < 1:
            raise ValueError(f"questions: entry {q.get('id')!r} has no options")
        cat = category_of(q["task"])
        p = 1.0 / n
        groups["Avg"].append(p)
        groups["Sta" if cat in STATIC_CATEGORIES else "Dyn"].append(p)
        groups[cat].append(p)
    return {c: (100.0 * sum(v) / len(v) if v else None) for c, v in groups.items()}


def mean_std(runs: Sequence[Mapping[str, Optional[float]]]) -> tuple[dict, dict]:
    """Column-wise mean and sample standard deviation (0 for a single run) of score dicts."""
    if not runs:
        raise ValueError("runs: need at least one score dict")
    mean, std = {}, {}
    for c in REPORT_COLUMNS:
        vals = [r[c] for r in runs if r.get(c) is not None]
        if not vals:
            mean[c] = std[c] = None
            continue
        m = sum(vals) / len(vals)
        mean[c] = m
        std[c] = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def scores_table(rows: Mapping[str, Mapping[str, Optional[float]]],
                 stds: Optional[Mapping[str, Mapping[str, Optional[float]]]] = None,
                 counts: Optional[Mapping[str, int]] = None) -> str:
    """A markdown table, one row per entry of `rows` (name -> {column: percent}), the 12 report
    columns; with `stds`, cells read "mean ± std"; with `counts`, a last row of question counts."""
    head = "| | " + " | ".join(REPORT_COLUMNS) + " |"
    rule = "|---|" + "|".join("---:" for _ in REPORT_COLUMNS) + "|"
    lines = [head, rule]
    for name, scores in rows.items():
        cells = []
        for c in REPORT_COLUMNS:
            v = scores.get(c)
            if v is None:
                cells.append("-")
            elif stds is not None and name in stds and stds[name].get(c) is not None:
                cells.append(f"{v:.1f} ± {stds[name][c]:.1f}")
            else:
                cells.append(f"{v:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if counts is not None:
        lines.append("| questions | " + " | ".join(str(counts.get(c, 0)) for c in REPORT_COLUMNS) + " |")
    return "\n".join(lines)


def teacher_quality_table(metrics: Mapping[str, float]) -> str:
    """Held-out depth AbsRel, flow EPE (all pixels and moving objects), motion IoU and camera-ray errors
    (where the teacher has the head), each beside its trivial baseline; flow also beside the
    Lucas-Kanade cue the encoder sees, where reported."""
    m = metrics
    rows = [
        ("depth AbsRel (lower is better)", m["depth_absrel"], "mean training depth", m["depth_absrel_mean_baseline"]),
        ("flow EPE, px (lower is better)", m["flow_epe"], "zero flow", m["flow_epe_zero_baseline"]),
    ]
    if "flow_epe_cue_baseline" in m:
        rows.append(("flow EPE, px (lower is better)", m["flow_epe"], "Lucas-Kanade cue alone",
                     m["flow_epe_cue_baseline"]))
    if "flow_epe_moving" in m:  # reports written before the moving-pixel EPE existed lack it
        rows.append(("flow EPE on moving objects, px (lower is better)", m["flow_epe_moving"], "zero flow",
                     m["flow_epe_moving_zero_baseline"]))
    if "flow_epe_moving_cue_baseline" in m:
        rows.append(("flow EPE on moving objects, px (lower is better)", m["flow_epe_moving"],
                     "Lucas-Kanade cue alone", m["flow_epe_moving_cue_baseline"]))
    rows += [
        ("motion IoU (higher is better)", m["motion_iou"], "all static", m["motion_iou_static_baseline"]),
    ]
    if "camray_deg" in m:  # teachers with a camray head; frames after the first
        rows += [("camera ray direction error, degrees (lower is better)", m["camray_deg"], "identity camera",
                  m["camray_deg_identity_baseline"]),
                 ("camera ray moment error, m (lower is better)", m["camray_moment"], "identity camera",
                  m["camray_moment_identity_baseline"])]
    lines = ["| metric | teacher | baseline | baseline's value |", "|---|---:|---|---:|"]
    lines += [f"| {a} | {b:.3f} | {c} | {d:.3f} |" for a, b, c, d in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Loss curves
# ---------------------------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a training run's metrics.jsonl (one JSON object per logged step)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics: {path} does not exist")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_curves(runs: Mapping[str, str | Path], out_png: str | Path, keys: Sequence[str] = ("loss_sft",),
                     title: str = "", smooth: int = 10) -> Path:
    """One panel per key in `keys`, one line per run (name -> metrics.jsonl); a running mean over
    `smooth` logged steps (the raw values faint behind it). Keys a run does not log are skipped."""
    plt = _agg()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(runs)}  # one colour per run in every panel
    for ax, key in zip(axes[0], keys):
        for name, path in runs.items():
            recs = [r for r in read_metrics(path) if isinstance(r.get(key), (int, float))]
            if not recs or all(r[key] == 0 for r in recs):
                continue
            steps = [r["step"] for r in recs]
            vals = [float(r[key]) for r in recs]
            ax.plot(steps, _smooth(vals, smooth), label=name, lw=1.5, color=colors[name])
            ax.plot(steps, vals, color=colors[name], alpha=0.2, lw=0.8)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png)


# ---------------------------------------------------------------------------------------------
# The teacher's predictions on a held-out video
# ---------------------------------------------------------------------------------------------


def flow_to_rgb(flow, max_mag: Optional[float] = None):
    """Flow [2, H, W] (pixels) -> an RGB image [H, W, 3] in [0, 1]: hue = direction, brightness =
    magnitude (saturating at `max_mag`, default the largest magnitude). rgpt4d.data.show's colouring,
    for the channels-first layout the models use."""
    f = np.asarray(flow, dtype=np.float64)
    if f.ndim != 3 or f.shape[0] != 2:
        raise ValueError(f"flow: expected [2, H, W], got {f.shape}")
    return flow_hw2_to_rgb(np.moveaxis(f, 0, -1), max_mag)


def plot_teacher_predictions(teacher_dir: str | Path, data_dir: str | Path, split: str, out_png: str | Path,
                             video_index: int = 0, num_frames: int = 4) -> Path:
    """RGB, then depth, flow and motion as ground truth and as the frozen teacher predicts them, for
    `num_frames` frames of one video of `split` (a held-out split: val or test)."""
    teacher = Teacher4D.load(teacher_dir)
    ds = Synth4DVideos(data_dir, split, fields=("rgb", "depth", "flow", "motion"))
    if not 0 <= video_index < len(ds):
        raise ValueError(f"video_index: {split} has {len(ds)} videos, got {video_index}")
    item = ds[video_index]
    batch = {k: item[k][None] for k in ("frames", "depth", "flow", "motion")}
    S = teacher.config.image_size
    with torch.no_grad():
        out = teacher(batch["frames"])
    tgt = targets_at(batch, S)
    T = batch["frames"].shape[1]
    frames = sorted({int(round(i)) for i in torch.linspace(1, T - 1, num_frames).tolist()})
    rgb = batch["frames"][0].float()
    rgb = rgb / 255.0 if batch["frames"].dtype == torch.uint8 else rgb
    d_gt, d_pr = tgt["depth"][0], out.depth[0]
    dmax = float(d_gt.max())
    f_gt, f_pr = tgt["flow"][0], out.flow[0]
    fmax = max(float(torch.linalg.vector_norm(f_gt[1:], dim=1).max()), 1e-3)
    rows = [
        ("RGB", lambda t: rgb[t].permute(1, 2, 0).clamp(0, 1).numpy(), {}),
        ("depth GT", lambda t: d_gt[t].numpy(), dict(cmap="magma_r", vmin=0, vmax=dmax)),
        ("depth teacher", lambda t: d_pr[t].numpy(), dict(cmap="magma_r", vmin=0, vmax=dmax)),
        ("flow GT", lambda t: flow_to_rgb(f_gt[t].numpy(), fmax), {}),
        ("flow teacher", lambda t: flow_to_rgb(f_pr[t].numpy(), fmax), {}),
        ("motion GT", lambda t: tgt["motion"][0, t].float().numpy(), dict(cmap="gray", vmin=0, vmax=1)),
        ("motion teacher", lambda t: torch.sigmoid(out.motion[0, t]).numpy(), dict(cmap="gray", vmin=0, vmax=1)),
    ]
    plt = _agg()
    fig, axes = plt.subplots(len(rows), len(frames), figsize=(1.7 * len(frames) + 0.8, 1.7 * len(rows)),
                             squeeze=False)
    ts = item["timestamps"]
    for r, (name, fn, kw) in enumerate(rows):
        for c, t in enumerate(frames):
            ax = axes[r][c]
            ax.imshow(fn(t), **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {t} ({float(ts[t]):.2f} s)", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"teacher vs ground truth, {split} video {item['video_id']}\n"
                 f"flow: hue = direction, brightness = magnitude (up to {fmax:.1f} px)", fontsize=8)
    return save_figure(fig, out_png)
