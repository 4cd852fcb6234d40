"""The `rgpt4d` command: `env`, `demo`, `study` and `infer` here; each subsystem adds its own
subcommands (rgpt4d.data.cli: `data ...`, `eval-answers`; rgpt4d.train.cli: `train ...`,
`teacher ...`, `eval`).

    rgpt4d infer --model PATH --video frames.npy --timestamps 0,0.5,... --boxes "x0,y0,x1,y1;..." \
        --question "How tall is <obj_1>?" --options "0.5 m" "1.0 m" "1.5 m" "2.0 m"
    rgpt4d infer --model PATH --data DIR --split test --out preds.jsonl     (batched, progress bar)

`--model` is a saved student or an NVILA folder (NVILA-Lite-8B, the released 4D-RGPT-8B:
llm/ + vision_tower/ + mm_projector/; docs/checkpoints.md).
`--video` is a .npy/.npz of frames [T, H, W, 3] uint8 (needs --timestamps or --fps), a video file
(decoded with PyAV; timestamps from the stream), or DATA_DIR:VIDEO_ID of a synthetic set.

Handlers import what they run when they run: building the parser must stay quick, and the model
stack (transformers' model classes) takes seconds to import.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rgpt4d import env as env_report
from rgpt4d.argtypes import float_list
from rgpt4d.data import Synth4DVideos, decode_video
from rgpt4d.data import cli as data_cli
from rgpt4d.train import cli as train_cli
from rgpt4d.train import study


def _err(cmd: str, e: Exception) -> int:
    print(f"rgpt4d {cmd}: error: {e}", file=sys.stderr)
    return 2


def _demo(args) -> int:
    from rgpt4d import demo  # start-up: the model stack

    return demo.main(args)


def _load_video(args, num_frames: int):
    spec = args.video
    if ":" in spec and not Path(spec).exists():
        root, vid = spec.rsplit(":", 1)
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
            ts = torch.tensor(float_list(args.timestamps, "timestamps"))
        elif args.fps:
            ts = torch.arange(frames.shape[0], dtype=torch.float32) / args.fps
        else:
            raise ValueError("--timestamps (or --fps) is needed with a .npy/.npz video")
        return frames, ts
    frames, ts = decode_video(path, num_frames=args.num_frames or num_frames)
    return frames, ts


def _cmd_infer(args) -> int:
    from rgpt4d.infer import RGPT4D  # start-up: the model stack

    try:
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
        boxes = [float_list(b, "boxes") for b in args.boxes.split(";") if b.strip()] if args.boxes else []
        for b in boxes:
            if len(b) != 4:
                raise ValueError(f"--boxes: each box is x0,y0,x1,y1; got {b}")
        print(model.answer(frames, ts, boxes, args.question, args.options, scoring=args.scoring))
    except (ValueError, FileNotFoundError, ImportError) as e:
        return _err("infer", e)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rgpt4d", description="4D-RGPT kernels and training/inference stack")
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="versions, build flags and available backends")
    env.set_defaults(func=lambda args: env_report.main())
    demo = sub.add_parser("demo", help="run the main job: data -> teacher -> SFT and P4D students -> table (README)")
    demo.add_argument("--preset", default="tiny", choices=("smoke", "tiny"),
                      help="smoke: a 2-minute check of the pipeline; tiny: the real demo (default)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    how = demo.add_mutually_exclusive_group()
    how.add_argument("--parallel", dest="parallel", action="store_const", const=True, default=None,
                     help="train and evaluate the two students at the same time, in two processes (the default "
                          "on a CPU with >= 2 threads)")
    how.add_argument("--sequential", dest="parallel", action="store_const", const=False,
                     help="train and evaluate the two students one after the other")
    demo.set_defaults(func=_demo)
    st = sub.add_parser("study", help="the paper's P4D/TPE ablations at our scale, several seeds (docs/results/)")
    study.add_arguments(st)
    st.set_defaults(func=study.main)
    inf = sub.add_parser("infer", help="answer questions with a saved student")
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

    data_cli.register(sub)
    train_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
