"""Subcommands `teacher train|cache` and `infer` for the `rgpt4d` command.

    rgpt4d teacher train --data DIR --out runs/teacher [--preset tiny] [--steps 300] [--batch-size 4]
    rgpt4d teacher cache --teacher runs/teacher --data DIR --out runs/teacher_cache
    rgpt4d teacher cache --teacher l4p:l4p.ckpt --data DIR --out runs/l4p_cache    (the L4P teacher)
    rgpt4d infer --model PATH --video frames.npy --timestamps 0,0.5,... --boxes "x0,y0,x1,y1;..." \
        --question "How tall is <obj_1>?" --options "0.5 m" "1.0 m" "1.5 m" "2.0 m"
    rgpt4d infer --model PATH --data DIR --split test --out preds.jsonl     (batched, progress bar)

`--model` is a saved student or an NVILA folder (NVILA-Lite-8B, the released 4D-RGPT-8B:
llm/ + vision_tower/ + mm_projector/; docs/checkpoints.md).

`--video` is a .npy/.npz of frames [T, H, W, 3] uint8 (needs --timestamps or --fps), a video file
(decoded with PyAV; timestamps from the stream), or DATA_DIR:VIDEO_ID of a synthetic set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _err(cmd: str, e: Exception) -> int:
    print(f"rgpt4d {cmd}: error: {e}", file=sys.stderr)
    return 2


def _cmd_teacher_train(args) -> int:
    from rgpt4d.models.teacher_train import train_teacher

    try:
        res = train_teacher(args.data, args.out, preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        return _err("teacher train", e)
    print(json.dumps(res["metrics"], indent=2))
    return 0


def _cmd_teacher_cache(args) -> int:
    from rgpt4d.models.teacher_train import cache_teacher

    try:
        teacher = _teacher_spec(args)
        n = cache_teacher(teacher, args.data, args.out, splits=tuple(args.splits), batch_size=args.batch_size,
                          progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        return _err("teacher cache", e)
    print(f"cached {n} videos in {args.out}")
    return 0


def _teacher_spec(args) -> str:
    """--teacher as Teacher4D.load reads it; an L4P checkpoint (`l4p:PATH` or a .ckpt file) takes
    --image-size, --num-frames, --hooks and --tasks into its spec (rgpt4d.models.teacher.l4p_spec)."""
    from rgpt4d.models.teacher import l4p_spec, parse_l4p_spec

    options = {"image_size": args.image_size, "num_frames": args.num_frames,
               "hooks": None if args.hooks is None else [int(x) for x in _parse_floats(args.hooks, "hooks")],
               "tasks": None if args.tasks is None else [t for t in args.tasks.replace(" ", "").split(",") if t]}
    spec = parse_l4p_spec(args.teacher)
    if spec is None:
        given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only for an L4P teacher (l4p:PATH or a .ckpt file)")
        return args.teacher
    path = Path(spec.pop("path")).resolve()  # the cache records it: a student run may start elsewhere
    return l4p_spec(path, **{**spec, **{k: v for k, v in options.items() if v is not None}})


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated numbers, got {text!r}") from None


def _load_video(args, num_frames: int):
    import numpy as np
    import torch

    spec = args.video
    if ":" in spec and not Path(spec).exists():
        root, vid = spec.rsplit(":", 1)
        from rgpt4d.data import Synth4DVideos

        ds = Synth4DVideos(root, None, fields=("rgb",))
        for i, v in enumerate(ds.videos):
            if v["id"] == vid:
                item = ds[i]
                return item["frames"], item["timestamps"]
        raise ValueError(f"--video: no video {vid!r} in {root}")
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"--video: {spec} does not exist")
    if path.suffix in (".npy", ".npz"):
        arr = np.load(path)
        if path.suffix == ".npz":
            arr = arr[arr.files[0]]
        frames = torch.from_numpy(np.ascontiguousarray(arr))
        if args.timestamps:
            ts = torch.tensor(_parse_floats(args.timestamps, "timestamps"))
        elif args.fps:
            ts = torch.arange(frames.shape[0], dtype=torch.float32) / args.fps
        else:
            raise ValueError("--timestamps (or --fps) is needed with a .npy/.npz video")
        return frames, ts
    from rgpt4d.data import decode_video

    frames, ts = decode_video(path, num_frames=args.num_frames or num_frames)
    return frames, ts


def _cmd_infer(args) -> int:
    from rgpt4d.infer import RGPT4D

    try:
        import torch

        dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        if dtype is None:
            dtype = torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32
        model = RGPT4D.from_pretrained(args.model, device=args.device, dtype=dtype)
        if args.data:
            preds = model.answer_dataset(args.data, args.split, args.out, batch_size=args.batch_size,
                                         limit=args.limit, progress=not args.quiet, scoring=args.scoring)
            if args.out is None:
                for p in preds:
                    print(json.dumps(p))
            else:
                print(f"wrote {len(preds)} predictions to {args.out}")
            return 0
        if not (args.video and args.question and args.options):
            raise ValueError("give --video, --question and --options (or --data DIR for a whole split)")
        frames, ts = _load_video(args, model.model.config.num_frames)
        boxes = [_parse_floats(b, "boxes") for b in args.boxes.split(";") if b.strip()] if args.boxes else []
        for b in boxes:
            if len(b) != 4:
                raise ValueError(f"--boxes: each box is x0,y0,x1,y1; got {b}")
        print(model.answer(frames, ts, boxes, args.question, args.options, scoring=args.scoring))
    except (ValueError, FileNotFoundError, ImportError) as e:
        return _err("infer", e)
    return 0


def register(subparsers) -> None:
    teacher = subparsers.add_parser("teacher", help="train the 4D teacher, or cache its outputs")
    tsub = teacher.add_subparsers(dest="teacher_command", required=True)
    tr = tsub.add_parser("train", help="train the teacher on a synthetic set; prints held-out quality")
    tr.add_argument("--data", required=True, help="a `rgpt4d data make` directory")
    tr.add_argument("--out", required=True, help="where to save the frozen teacher")
    tr.add_argument("--preset", default="tiny", choices=("smoke", "tiny", "small", "paper"))
    tr.add_argument("--steps", type=int, default=300)
    tr.add_argument("--batch-size", type=int, default=4)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=_cmd_teacher_train)
    ca = tsub.add_parser("cache", help="write the teacher's latents and explicit outputs per video")
    ca.add_argument("--teacher", required=True,
                    help="a `rgpt4d teacher train` folder, or an L4P checkpoint: l4p:PATH or a .ckpt file")
    ca.add_argument("--image-size", type=int, help="L4P teacher: input size (default 224)")
    ca.add_argument("--num-frames", type=int, help="L4P teacher: frames per window (default 16)")
    ca.add_argument("--hooks", help="L4P teacher: the four encoder layers read, e.g. 14,21,28,36 (the default)")
    ca.add_argument("--tasks", help="L4P teacher: the heads to load, e.g. depth,flow,motion (default: all it has "
                                    "among depth, flow, motion, camray)")
    ca.add_argument("--data", required=True)
    ca.add_argument("--out", required=True)
    ca.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    ca.add_argument("--batch-size", type=int, default=4)
    ca.add_argument("--quiet", action="store_true")
    ca.set_defaults(func=_cmd_teacher_cache)

    inf = subparsers.add_parser("infer", help="answer questions with a saved student")
    inf.add_argument("--model", required=True)
    inf.add_argument("--video", help=".npy/.npz frames [T,H,W,3], a video file, or DATA_DIR:VIDEO_ID")
    inf.add_argument("--timestamps", help="comma-separated seconds, one per frame")
    inf.add_argument("--fps", type=float)
    inf.add_argument("--num-frames", type=int, help="frames decoded from a video file (default: the model's)")
    inf.add_argument("--boxes", help="first-frame boxes 'x0,y0,x1,y1;x0,y0,x1,y1' (<obj_1>, <obj_2>, ...)")
    inf.add_argument("--question")
    inf.add_argument("--options", nargs="+")
    inf.add_argument("--data", help="answer a whole split of a synthetic set instead")
    inf.add_argument("--split", default="test")
    inf.add_argument("--limit", type=int)
    inf.add_argument("--out", help="JSONL predictions (for rgpt4d eval-answers)")
    inf.add_argument("--batch-size", type=int, default=8)
    inf.add_argument("--device", default="cpu")
    inf.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                     help="weights' dtype (auto: bfloat16 on cuda, float32 on cpu)")
    inf.add_argument("--scoring", choices=("auto", "letter", "likelihood"), default="auto",
                     help="how the answer is read (default: the model's own; see rgpt4d.infer)")
    inf.add_argument("--quiet", action="store_true")
    inf.set_defaults(func=_cmd_infer)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="rgpt4d")
    register(p.add_subparsers(dest="command", required=True))
    a = p.parse_args()
    sys.exit(int(a.func(a) or 0))
