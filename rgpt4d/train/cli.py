"""Subcommands `train teacher|student`, `teacher train|cache` and `eval` for the `rgpt4d` command
(`train` also as `python -m rgpt4d.train`).

    rgpt4d train teacher --data DIR --out runs/teacher --preset smoke
    rgpt4d teacher train --data DIR --out runs/teacher [--preset tiny] [--steps 300] [--batch-size 4]
    rgpt4d teacher cache --teacher runs/teacher --data DIR --out runs/cache
    rgpt4d teacher cache --teacher l4p:l4p.ckpt --data DIR --out runs/l4p_cache    (the L4P teacher)
    rgpt4d train student --data DIR --teacher-cache runs/cache --out runs/student --preset smoke \
        [--p4d none|latent|explicit|both] [--tpe on|off] [--ops fused|eager] [--resume]
    rgpt4d train student ... --preset paper --init-from nvila:NVILA-Lite-8B     (or --vision V --llm L [--tokenizer T])
    rgpt4d eval --model runs/student/model --data DIR [--split test]
    rgpt4d eval r4d-bench --root RELEASE --model runs/student/model --out runs/r4d [--limit N] [--skip-bad]
    torchrun --nproc_per_node=2 -m rgpt4d.train student ...        (DDP; docs/training.md)
    torchrun --nproc_per_node=8 -m rgpt4d.train student --strategy fsdp ...   (FSDP2 shards)

The run's configuration is the preset's (rgpt4d.train.config), then `--config FILE` (a saved
config.json), then every flag given. With --resume and no --config, the run's own
`<out>/config.json` is the base, so a resumed run continues with the same settings.
`rgpt4d teacher train` is `train teacher` with a preset and a few numbers (train_teacher_from_preset).

The handlers import the training modules when they run: building the `rgpt4d` parser reads this
module, and the model stack (transformers' model classes) takes seconds to import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rgpt4d.argtypes import float_list, non_negative
from rgpt4d.models.tokenizer import RESTATE_MODES
from rgpt4d.train.checkpoint import CheckpointError
from rgpt4d.train.config import OPS_MODES, P4D_MODES, STRATEGIES, TRAIN_PRESETS, TrainConfig, train_config

# flag -> TrainConfig field, for student runs; teacher runs map --steps/--batch-size/--lr to teacher_*
_COMMON = {"seed": "seed", "device": "device", "ops": "ops", "weight_decay": "weight_decay", "warmup": "warmup",
           "max_grad_norm": "max_grad_norm", "log_every": "log_every", "ckpt_every": "ckpt_every",
           "keep_last": "keep_last", "num_workers": "num_workers", "bf16": "bf16"}
_STUDENT = {"steps": "steps", "epochs": "epochs", "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr",
            "p4d": "p4d", "tpe": "tpe", "decoder": "decoder", "loss_preset": "loss_preset",
            "min_lr_ratio": "min_lr_ratio", "answer_format": "answer_format", "restate": "restate",
            "questions_per_sequence": "questions_per_sequence", "init_from": "init_from", "vision": "init_vision",
            "llm": "init_llm", "tokenizer": "init_tokenizer", "strategy": "strategy"}
_TEACHER = {"steps": "teacher_steps", "batch_size": "teacher_batch_size", "lr": "teacher_lr"}


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _err(cmd: str, e: Exception) -> int:
    print(f"rgpt4d {cmd}: error: {e}", file=sys.stderr)
    return 2


def _positive(name: str):
    """An argparse `type=` for an integer >= 1, with errors naming `name`."""
    base = non_negative(int, name)

    def parse(text: str) -> int:
        value = base(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {text}")
        return value

    return parse


def _on_off(name: str):
    def parse(text: str) -> bool:
        if text not in ("on", "off"):
            raise argparse.ArgumentTypeError(f"{name} must be 'on' or 'off', got {text!r}")
        return text == "on"

    return parse


def resolve_config(args, fields: dict):
    """The run's TrainConfig: preset (or --config, or the run's saved config on --resume) + flags."""
    saved = Path(args.out) / "config.json"
    if args.config:
        cfg = TrainConfig.load(args.config)
    elif args.resume and saved.exists():
        cfg = TrainConfig.load(saved)
    else:
        cfg = train_config(args.preset or "smoke")
    changes = {field: getattr(args, flag) for flag, field in {**_COMMON, **fields}.items()
               if getattr(args, flag, None) is not None}
    if changes.get("init_vision") or changes.get("init_llm"):
        changes.setdefault("init_from", "parts")
    if args.preset and args.preset != cfg.preset:
        changes["preset"] = args.preset
    return cfg.replace(**changes)


def _cmd_train_teacher(args) -> int:
    from rgpt4d.train.teacher import train_teacher  # start-up: the model stack

    try:
        cfg = resolve_config(args, _TEACHER)
        res = train_teacher(cfg, args.data, args.out, resume=args.resume, progress=not args.quiet,
                            log=print if _is_main() else None)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        return _err("train teacher", e)
    if _is_main():
        print(json.dumps({k: res[k] for k in ("steps", "seconds", "loss", "metrics", "teacher_path")}, indent=2))
    return 0


def _cmd_train_student(args) -> int:
    from rgpt4d.train.student import evaluate_student, train_student  # start-up: the model stack

    try:
        cfg = resolve_config(args, _STUDENT)
        res = train_student(cfg, args.data, args.teacher_cache, args.out, resume=args.resume, progress=not args.quiet,
                            teacher=args.teacher, log=print if _is_main() else None)
        if _is_main():
            print(json.dumps(res, indent=2))
            if args.eval_split and res["model_path"]:
                report = evaluate_student(res["model_path"], args.data, args.eval_split, progress=not args.quiet)
                Path(args.out, f"eval_{args.eval_split}.json").write_text(json.dumps(report, indent=2))
                print(report["markdown"])
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        return _err("train student", e)
    return 0


def _cmd_eval(args) -> int:
    from rgpt4d.train.student import evaluate_student  # start-up: the model stack

    if args.target == "r4d-bench":
        return _cmd_eval_r4d_bench(args)
    if args.data is None:
        return _err("eval", ValueError("--data is required (a `rgpt4d data make` directory), or evaluate a "
                                       "release with `rgpt4d eval r4d-bench --root DIR --model PATH --out DIR`"))
    try:
        report = evaluate_student(args.model, args.data, args.split, batch_size=args.batch_size or 8,
                                  limit=args.limit, device=args.device, progress=not args.quiet,
                                  predictions_out=args.predictions, unparseable=args.unparseable or "wrong",
                                  scoring=args.scoring)
    except (ValueError, FileNotFoundError) as e:
        return _err("eval", e)
    print(report["markdown"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _cmd_eval_r4d_bench(args) -> int:
    from rgpt4d.train.bench import eval_r4d_bench  # start-up: the model stack

    missing = [flag for flag, v in (("--root", args.root), ("--out", args.out)) if v is None]
    if missing:
        return _err("eval r4d-bench", ValueError(f"{' and '.join(missing)} required: rgpt4d eval r4d-bench --root DIR "
                                                 "--model PATH --out DIR"))
    try:
        result = eval_r4d_bench(args.root, args.model, args.out, limit=args.limit, num_frames=args.num_frames,
                                skip_bad=args.skip_bad, batch_size=args.batch_size or 4, device=args.device,
                                unparseable=args.unparseable or "random", progress=not args.quiet,
                                log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError, ImportError) as e:
        return _err("eval r4d-bench", e)
    print(result["markdown"])
    print(f"wrote {Path(args.out) / 'predictions.jsonl'}, report.md and report.json "
          f"({result['answered_now']} answered in this run)")
    return 0


def _cmd_teacher_train(args) -> int:
    from rgpt4d.train.teacher import train_teacher_from_preset  # start-up: the model stack

    try:
        res = train_teacher_from_preset(args.data, args.out, preset=args.preset, steps=args.steps,
                                        batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                        progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        return _err("teacher train", e)
    print(json.dumps(res["metrics"], indent=2))
    return 0


def _cmd_teacher_cache(args) -> int:
    from rgpt4d.train.teacher_cache import cache_teacher  # start-up: the model stack

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
    from rgpt4d.models.teacher import l4p_spec, parse_l4p_spec  # start-up: the model stack

    options = {"image_size": args.image_size, "num_frames": args.num_frames,
               "hooks": None if args.hooks is None else [int(x) for x in float_list(args.hooks, "hooks")],
               "tasks": None if args.tasks is None else [t for t in args.tasks.replace(" ", "").split(",") if t]}
    spec = parse_l4p_spec(args.teacher)
    if spec is None:
        given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only for an L4P teacher (l4p:PATH or a .ckpt file)")
        return args.teacher
    path = Path(spec.pop("path")).resolve()  # the cache records it: a student run may start elsewhere
    return l4p_spec(path, **{**spec, **{k: v for k, v in options.items() if v is not None}})


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a `rgpt4d data make` directory")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, config.json, the model")
    p.add_argument("--preset", choices=TRAIN_PRESETS, help="model + optimisation preset (default smoke)")
    p.add_argument("--config", help="a saved config.json to start from instead of the preset")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--steps", type=non_negative(int, "--steps"), help="optimizer steps")
    p.add_argument("--batch-size", type=non_negative(int, "--batch-size"), help="global batch per optimizer step")
    p.add_argument("--lr", type=non_negative(float, "--lr"))
    p.add_argument("--weight-decay", type=non_negative(float, "--weight-decay"))
    p.add_argument("--warmup", type=non_negative(float, "--warmup"), help="fraction of the steps (< 1) or steps")
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping (<= 0: off)")
    p.add_argument("--seed", type=non_negative(int, "--seed"))
    p.add_argument("--ops", choices=OPS_MODES, help="fused: rgpt4d's kernels; eager: the PyTorch references")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--bf16", type=_on_off("--bf16"), help="bf16 autocast on GPU: on|off")
    p.add_argument("--log-every", type=non_negative(int, "--log-every"))
    p.add_argument("--ckpt-every", type=non_negative(int, "--ckpt-every"), help="checkpoint every N steps (0: at the end)")
    p.add_argument("--keep-last", type=non_negative(int, "--keep-last"))
    p.add_argument("--num-workers", type=non_negative(int, "--num-workers"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_train_parsers(sub) -> None:
    """`teacher` and `student` parsers on `sub` (used by `rgpt4d train` and `python -m rgpt4d.train`)."""
    te = sub.add_parser("teacher", help="train the 4D teacher (then `rgpt4d teacher cache`)")
    _add_common(te)
    te.set_defaults(func=_cmd_train_teacher)

    st = sub.add_parser("student", help="train the student: L_SFT + alpha L_LD + beta L_ED")
    _add_common(st)
    st.add_argument("--teacher-cache", help="`rgpt4d teacher cache` output (needed unless --p4d none)")
    st.add_argument("--teacher", help="teacher folder (default: the one the cache names)")
    st.add_argument("--p4d", choices=P4D_MODES, help="distillation terms (default both)")
    st.add_argument("--tpe", type=_on_off("--tpe"), help="timestamp positional encoding: on|off (default on)")
    st.add_argument("--decoder", choices=("mlp", "linear"), help="D_4DP: the paper's mlp or the code's linear")
    st.add_argument("--loss-preset", choices=("paper", "code"), help="P4D weights (default paper)")
    st.add_argument("--epochs", type=non_negative(float, "--epochs"), help="with --steps 0: train this many epochs")
    st.add_argument("--grad-accum", type=non_negative(int, "--grad-accum"), help="micro-batches per step")
    st.add_argument("--min-lr-ratio", type=non_negative(float, "--min-lr-ratio"))
    st.add_argument("--answer-format", choices=("auto", "letter", "option", "rank"),
                    help="the SFT target: the letter; the option's text then its letter; rank: as option, with a value's rank among all-number options as its text (default: the preset's)")
    st.add_argument("--restate", choices=("auto", "off", *RESTATE_MODES),
                    help="repeat the question's regions: off; line (a `Regions:` line before <|assistant|>); answer "
                         "(right after <|assistant|>, where the answer's first token is predicted); default: the preset's")
    st.add_argument("--questions-per-sequence", type=non_negative(int, "--questions-per-sequence"),
                    help="> 1: up to N questions of one video per multi-turn training sequence (default 1)")
    st.add_argument("--init-from", help="start from pretrained weights: nvila:PATH (an NVILA folder: NVILA-Lite-8B, "
                                        "4D-RGPT-8B; docs/checkpoints.md); default: a new student of the preset")
    st.add_argument("--vision", help="start from Hugging Face parts: a SiglipVisionModel folder (with --llm)")
    st.add_argument("--llm", help="a Qwen2ForCausalLM folder (with --vision)")
    st.add_argument("--tokenizer", help="a fast tokenizer folder (tokenizer.json; default: the --llm folder)")
    st.add_argument("--strategy", choices=STRATEGIES,
                    help="with several processes (torchrun): ddp replicates the model (default); fsdp shards "
                         "parameters, gradients and optimizer state (FSDP2; docs/training.md)")
    st.add_argument("--eval-split", help="after training, evaluate the model on this split (e.g. test)")
    st.set_defaults(func=_cmd_train_student)


def _add_teacher_parsers(subparsers) -> None:
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


def register(subparsers) -> None:
    _add_teacher_parsers(subparsers)
    train = subparsers.add_parser("train", help="train the teacher or the student (see docs/training.md)")
    add_train_parsers(train.add_subparsers(dest="train_command", required=True))

    ev = subparsers.add_parser("eval", help="evaluate a saved student on a split (--data) or on an R4D-Bench "
                                            "release (`eval r4d-bench`): the 12-column R4D report")
    ev.add_argument("target", nargs="?", choices=("r4d-bench",),
                    help="r4d-bench: answer a release (--root) and write predictions.jsonl, report.md and "
                         "report.json in --out; a rerun answers only the ids not yet in predictions.jsonl")
    ev.add_argument("--model", required=True, help="a saved student (<run>/model)")
    ev.add_argument("--data", help="a `rgpt4d data make` directory")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"))
    ev.add_argument("--root", help="r4d-bench: the release folder (test.json, videos, SoM images)")
    ev.add_argument("--out", help="r4d-bench: where predictions.jsonl and the report go")
    ev.add_argument("--num-frames", type=_positive("--num-frames"),
                    help="r4d-bench: frames sampled per video (default: the student's, 16 in the paper)")
    ev.add_argument("--skip-bad", action="store_true",
                    help="r4d-bench: report and skip bad entries (malformed, missing or undecodable files) "
                         "instead of stopping at the first; the report counts them")
    ev.add_argument("--batch-size", type=_positive("--batch-size"), default=None,
                    help="questions per forward pass (default 8; r4d-bench 4)")
    ev.add_argument("--limit", type=_positive("--limit"), help="only the first N questions")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--predictions", help="also write the predictions as JSONL here")
    ev.add_argument("--unparseable", choices=("wrong", "random"), default=None,
                    help="how an answer without a valid letter scores (default wrong; r4d-bench: random, the "
                         "official rule)")
    ev.add_argument("--scoring", choices=("auto", "letter", "likelihood"), default="auto",
                    help="letter: the letter the model writes; likelihood: the most likely option text; "
                         "auto: the model's own (likelihood for the option answer format)")
    ev.add_argument("--json", help="also write the report as JSON here")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=_cmd_eval)


def main(argv: list[str] | None = None) -> int:
    """`python -m rgpt4d.train teacher|student ...` (what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="python -m rgpt4d.train")
    add_train_parsers(parser.add_subparsers(dest="train_command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
