"""argparse `type=` helpers shared by the subcommands of the `rgpt4d` command (rgpt4d.data.cli,
rgpt4d.train.cli); standard library only, so any layer may use them."""

from __future__ import annotations

import argparse


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


def float_list(text: str, what: str) -> list[float]:
    """Comma-separated numbers -> floats; a ValueError naming `--{what}` otherwise."""
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated numbers, got {text!r}") from None
