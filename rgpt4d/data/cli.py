"""Subcommands `data make|show|stats` and `eval-answers` for the `rgpt4d` command.

`register(subparsers)` adds them to an argparse subparsers object; every parser sets
`func(args) -> int`. `python -m rgpt4d.data.cli ...` runs them without the main command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rgpt4d.argtypes import non_negative
from rgpt4d.data.baseline import text_only_check
from rgpt4d.data.evaluate import evaluate, load_predictions, read_questions
from rgpt4d.data.generate import MakeConfig, make_dataset
from rgpt4d.data.show import dataset_stats, format_stats, show_sample


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


def _cmd_make(args: argparse.Namespace) -> int:
    cfg = MakeConfig(
        out=args.out,
        num_videos=args.num_videos,
        seed=args.seed,
        frames=args.frames,
        size=args.size,
        workers=args.workers,
        shard_size=args.shard_size,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    try:
        summary = make_dataset(cfg)
    except (ValueError, FileExistsError) as e:
        print(f"rgpt4d data make: error: {e}", file=sys.stderr)
        return 2
    s = summary["splits"]
    print(
        f"wrote {args.num_videos} videos to {summary['out']} in {summary['seconds']:.1f} s "
        f"({summary['videos_per_second']:.1f} videos/s); questions: "
        + ", ".join(f"{k} {v['questions']} ({v['videos']} videos)" for k, v in s.items())
    )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    try:
        path = show_sample(args.dir, args.index, args.out, frames=args.frames)
    except (ValueError, FileNotFoundError) as e:
        print(f"rgpt4d data show: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    try:
        stats = dataset_stats(args.dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"rgpt4d data stats: error: {e}", file=sys.stderr)
        return 2
    result = None
    if args.baseline:
        root = Path(args.dir)
        train = json.loads((root / "train.json").read_text(encoding="utf-8"))
        test = json.loads((root / "test.json").read_text(encoding="utf-8"))
        try:
            result = text_only_check(train, test)
        except ValueError as e:
            print(f"rgpt4d data stats: error: {e}", file=sys.stderr)
            return 2
        stats["text_only_baseline"] = {
            "accuracy": result.accuracy,
            "chance": result.chance,
            "counts": result.counts,
        }
    if args.json:
        print(json.dumps(stats, indent=1, ensure_ascii=False))
    else:
        print(format_stats(stats))
        if result is not None:
            print("\ntext-only baseline (train.json -> test.json):")
            print(result.to_markdown())
    if result is not None:
        judged = {k: m for k, m in result.margin().items() if result.counts[k] >= args.min_questions}
        small = sorted(set(result.counts) - set(judged))
        if small:
            print(
                f"not judged (fewer than {args.min_questions} test questions, too noisy): "
                f"{', '.join(small)}; "
                "make more videos for a meaningful check",
                file=sys.stderr,
            )
        failed = {k: m for k, m in judged.items() if m > args.max_margin}
        if failed:
            print(
                "text-only baseline beats chance by more than "
                f"{args.max_margin} points: " + ", ".join(f"{k} +{m:.1f}" for k, m in failed.items()),
                file=sys.stderr,
            )
            return 1
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        try:
            questions, bad = read_questions(args.questions, skip_bad=args.skip_bad)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"--questions {e}") from None
        predictions = load_predictions(args.predictions)
        report = evaluate(questions, predictions, unparseable=args.unparseable, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"rgpt4d eval-answers: error: {e}", file=sys.stderr)
        return 2
    report.skipped = bad
    for b in bad:
        print(f"skipped {b['file']}: entry {b['index']} (id {b['id']!r}): {b['reason']}", file=sys.stderr)
    print(report.to_markdown())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(report.to_markdown() + "\n", encoding="utf-8")
    return 0


def register(subparsers) -> None:
    """Add `data` (make, show, stats) and `eval-answers` to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="synthetic 4D dataset: make, show, stats")
    data_sub = data.add_subparsers(dest="data_command", metavar="{make,show,stats}")
    data_sub.required = True

    make = data_sub.add_parser("make", help="render videos and write R4D-style questions")
    make.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    make.add_argument("--num-videos", type=_positive_int("--num-videos"), required=True)
    make.add_argument("--seed", type=non_negative(int, "--seed"), default=0)
    make.add_argument(
        "--frames", type=_positive_int("--frames"), default=16, help="frames per video (default 16)"
    )
    make.add_argument(
        "--size",
        type=_positive_int("--size"),
        default=64,
        help="frame height and width in pixels (default 64)",
    )
    make.add_argument("--workers", type=_positive_int("--workers"), default=min(2, os.cpu_count() or 1))
    make.add_argument(
        "--shard-size", type=_positive_int("--shard-size"), default=32, help="videos per shard file"
    )
    make.add_argument("--min-objects", type=_positive_int("--min-objects"), default=1)
    make.add_argument("--max-objects", type=_positive_int("--max-objects"), default=6)
    make.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of videos in val.json (default 0.1)"
    )
    make.add_argument(
        "--test-fraction", type=float, default=0.1, help="share of videos in test.json (default 0.1)"
    )
    make.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    make.set_defaults(func=_cmd_make)

    show = data_sub.add_parser("show", help="contact sheet of one video and its questions")
    show.add_argument("dir")
    show.add_argument(
        "--index", type=non_negative(int, "--index"), default=0, help="video number in the manifest"
    )
    show.add_argument("--out", required=True, help="PNG to write")
    show.add_argument("--frames", type=_positive_int("--frames"), default=6, help="frames to show")
    show.set_defaults(func=_cmd_show)

    stats = data_sub.add_parser("stats", help="counts per category, answer position, frame rate")
    stats.add_argument("dir")
    stats.add_argument(
        "--baseline", action="store_true", help="also run the text-only baseline (train -> test)"
    )
    stats.add_argument(
        "--max-margin",
        type=float,
        default=5.0,
        help="with --baseline: exit 1 if it beats chance by more points than this (default 5)",
    )
    stats.add_argument(
        "--min-questions",
        type=_positive_int("--min-questions"),
        default=200,
        help="with --baseline: judge only categories with at least this many test questions (default 200)",
    )
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=_cmd_stats)

    ev = subparsers.add_parser("eval-answers", help="score predictions on R4D-Bench style questions")
    ev.add_argument("--questions", required=True, help="test.json (R4D-Bench schema)")
    ev.add_argument("--predictions", required=True, help='JSONL lines {"id": ..., "prediction": "..."}')
    ev.add_argument(
        "--unparseable",
        choices=("wrong", "random"),
        default="wrong",
        help="score answers with no valid letter as wrong (default) or as a seeded random letter (official)",
    )
    ev.add_argument(
        "--seed", type=non_negative(int, "--seed"), default=0, help="seed of the random-letter mode"
    )
    ev.add_argument("--json", help="also write the report as JSON here")
    ev.add_argument("--markdown", help="also write the report as markdown here")
    ev.add_argument("--skip-bad", action="store_true",
                    help="report and skip malformed entries (a missing field, an answer not among the options) "
                         "instead of stopping at the first")
    ev.set_defaults(func=_cmd_eval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rgpt4d.data.cli")
    sub = parser.add_subparsers(dest="command", metavar="{data,eval-answers}")
    sub.required = True
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
