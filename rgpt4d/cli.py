"""The `rgpt4d` command. Each subsystem adds its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules with a `register(subparsers)` adding their subcommands; optional until they exist.
_SUBCOMMAND_MODULES = ("rgpt4d.data.cli", "rgpt4d.models.cli", "rgpt4d.train.cli")


def non_negative(kind, name: str):
    """An argparse `type=` for a number >= 0 of `kind` (int or float), with errors naming `name`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rgpt4d", description="4D-RGPT kernels and training/inference stack")
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="versions, build flags and available backends")
    env.set_defaults(func=lambda args: __import__("rgpt4d.env", fromlist=["main"]).main())
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
    demo.set_defaults(func=lambda args: __import__("rgpt4d.demo", fromlist=["main"]).main(args))
    study = sub.add_parser("study", help="the paper's P4D/TPE ablations at our scale, several seeds (docs/results/)")
    __import__("rgpt4d.train.study", fromlist=["add_arguments"]).add_arguments(study)
    study.set_defaults(func=lambda args: __import__("rgpt4d.train.study", fromlist=["main"]).main(args))
    for name in _SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # that subsystem is not in this build
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
