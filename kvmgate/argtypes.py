"""Argument value types shared by every entry point that parses options (cli/, bench/):
argparse `type=` callables that refuse a bad value with one line naming it."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return v


def nonneg_int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return v


__all__ = ["positive_int", "nonneg_int"]
