"""`rgpt4d eval r4d-bench`: answer an R4D-Bench release with a saved student and score it.

    rgpt4d eval r4d-bench --root DIR --model PATH --out DIR [--limit N] [--num-frames 16] [--skip-bad]

The release (rgpt4d.data.r4d_bench: ROOT/test.json, the videos, the SoM images) gives regions only
as its SoM images, so each question's `<obj_N>` boxes are read back from its SoM image
(rgpt4d.data.som.boxes_from_som) for a student with region tokens, and the SoM image itself is the
first image for a student whose region mode reads it ("som", "both"). Predictions go to
`<out>/predictions.jsonl` as they are made (a rerun answers only the ids not yet there); the 12-column
report to `<out>/report.md` and `<out>/report.json`.

Bad input (malformed JSON, an entry missing a field or with an answer not among its options, a
missing or undecodable video, a missing SoM image) stops the run with a ReleaseError naming the file
and the entry id; with `skip_bad` such entries are reported, skipped and counted in the report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from rgpt4d.data.evaluate import ReleaseError, check_entries, evaluate, load_predictions, read_json_list
from rgpt4d.data.r4d_bench import require_av, entry_media, resolve_som, resolve_video
from rgpt4d.data.som import boxes_from_som
from rgpt4d.infer import RGPT4D


def question_regions(question: str, som, frame_size: int) -> tuple[list, int, int]:
    """Boxes in `<obj_N>` order (box i is `<obj_{i+1}>`, zeros where not found) in the pixels of a
    frame_size x frame_size frame, from the SoM image (uint8 [3, H, W]); also (found, referenced)."""
    numbers = sorted({int(n) for n in re.findall(r"<obj_(\d+)>", question)})
    if not numbers:
        return [], 0, 0
    img = som.permute(1, 2, 0).numpy()
    H, W = img.shape[:2]
    found = boxes_from_som(img, numbers)
    sx, sy = frame_size / W, frame_size / H
    boxes = [[0.0, 0.0, 0.0, 0.0]] * max(numbers)
    for n, (x0, y0, x1, y1) in found.items():
        boxes[n - 1] = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
    return boxes, len(found), len(numbers)


def _answered(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    return load_predictions(path)


def eval_r4d_bench(root: str | Path, model: str | Path, out: str | Path, *, limit: Optional[int] = None,
                   num_frames: Optional[int] = None, skip_bad: bool = False, batch_size: int = 4,
                   device: str = "cpu", unparseable: str = "random", seed: int = 0, progress: bool = True,
                   log: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """Answer the release at `root` with the student at `model`; returns the report as JSON (scores,
    counts, unparseable, missing, skipped, regions found, answered now) and writes predictions.jsonl,
    report.md and report.json in `out`. `unparseable`: "random" is the official rule (a seeded
    random letter); the students here always answer with a valid letter."""
    root, out = Path(root), Path(out)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    qpath = root / "test.json"
    raw = read_json_list(qpath)[:limit]  # --limit: the release's first N entries
    entries, bad = check_entries(raw, qpath, skip_bad)
    index = {str(e["id"]): i for i, e in enumerate(raw) if isinstance(e, dict) and "id" in e}
    require_av()
    if not progress:  # also transformers' own bars (loading the weights)
        hf_logging.disable_progress_bar()
    wrapper = RGPT4D.from_pretrained(model, device=device)
    cfg = wrapper.model.config
    frames_wanted = cfg.num_frames if num_frames is None else num_frames
    if frames_wanted != cfg.num_frames:
        raise ValueError(f"--num-frames {num_frames}: the student at {model} takes {cfg.num_frames} frames")

    def skip(e, err):
        if not skip_bad:
            raise ReleaseError(str(err)) from None
        bad.append({"id": e["id"], "index": index[str(e["id"])], "file": str(qpath), "reason": str(err)})

    # the files every entry needs, before any answering (decoding errors show up as they are decoded)
    good = []
    for e in entries:
        try:
            resolve_video(root, e)
            resolve_som(root, e)
        except FileNotFoundError as err:
            skip(e, err)
            continue
        good.append(e)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    done = _answered(pred_path)
    todo = [e for e in good if str(e["id"]) not in done]
    S = cfg.image_size
    regions_found = regions_referenced = 0
    bar = None
    if progress:
        bar = tqdm(total=len(good), initial=len(good) - len(todo), desc="r4d-bench", unit="q", dynamic_ncols=True)
    answered_now = 0
    with open(pred_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            items = []
            for e in todo[start:start + batch_size]:
                try:
                    media = entry_media(root, e, frames_wanted, (S, S), som_size=None)
                except ReleaseError as err:
                    skip(e, err)
                    continue
                # boxes from the SoM image as released (resampling blurs its one-pixel lines), then the
                # image at the student's size, like the frames
                boxes, found, referenced = question_regions(e["question"], media["som_image"], S)
                som = F.interpolate(media["som_image"][None].float(), size=(S, S), mode="bilinear",
                                    align_corners=False, antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
                regions_found, regions_referenced = regions_found + found, regions_referenced + referenced
                items.append(dict(video=media["frames"], timestamps=media["timestamps"], regions=boxes,
                                  question=e["question"], options=[str(o) for o in e["options"]],
                                  som_image=som if cfg.region_mode in ("som", "both") else None,
                                  id=str(e["id"])))
            if items:
                letters = wrapper.answer_batch(items, batch_size=len(items), progress=False)
                for it, letter in zip(items, letters):
                    f.write(json.dumps({"id": it["id"], "prediction": letter}) + "\n")
                    done[it["id"]] = letter
                f.flush()
                answered_now += len(items)
            if bar is not None:
                bar.update(len(todo[start:start + batch_size]))
    if bar is not None:
        bar.close()
    skipped_ids = {str(b["id"]) for b in bad}
    scored = [e for e in good if str(e["id"]) not in skipped_ids]
    report = evaluate(scored, done, unparseable=unparseable, seed=seed)
    report.skipped = bad
    result = {**report.to_json(), "answered_now": answered_now, "root": str(root), "model": str(model),
              "num_frames": frames_wanted, "region_mode": cfg.region_mode,
              "regions_found": regions_found, "regions_referenced": regions_referenced}
    md = report.to_markdown()
    if cfg.region_mode in ("tokens", "both") and regions_referenced:
        md += (f" Region boxes read from the SoM images: {regions_found} of {regions_referenced} referenced "
               "regions of the questions answered in this run.")
    result["markdown"] = md
    (out / "report.md").write_text(f"# R4D-Bench: {model}\n\n{md}\n", encoding="utf-8")
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if log is not None:
        for b in bad:
            log(f"skipped: {b['file']}: entry {b['index']} (id {b['id']!r}): {b['reason']}")
    return result
