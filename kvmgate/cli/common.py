"""What every kvmgate entry point shares: error-to-exit-code mapping and MSR arguments."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from ..errors import KvmError, UserError
from ..exits import GuestError


def run_main(ap: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse and dispatch; user mistakes exit 2, failures 1, Ctrl-C 130, never a traceback."""
    ap.exit_on_error = False
    try:
        a = ap.parse_args(argv)
    except argparse.ArgumentError as e:
        print(f"kvmgate: error: {e}", file=sys.stderr)
        return 2
    try:
        return a.fn(a)
    except UserError as e:
        print(f"kvmgate: error: {e}", file=sys.stderr)
        return 2
    except (TimeoutError, GuestError) as e:
        print(f"kvmgate: {e}", file=sys.stderr)
        return 1
    except KvmError as e:
        print(f"kvmgate: KVM error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def parse_msrs(words: list[str]) -> list[int]:
    """MSR names or indices from the command line; unknown ones are a UserError with hints."""
    from ..msr import names
    out = []
    for w in words:
        i = names.msr_index(w)
        if i is None:
            hint = names.suggest(w)
            raise UserError(f"unknown MSR {w!r}" + (f"; did you mean {', '.join(hint)}?" if hint else ""),
                            "argument MSR")
        out.append(i)
    return out


def out_path(path: str, what: str = "output") -> Path:
    """An output file we can create: its directory exists and is writable, it is not a directory."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} is a directory", path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {what}: directory {parent} does not exist", path)
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"cannot write {what}: permission denied", path)
    return p


def in_path(path: str, what: str) -> Path:
    p = Path(path)
    try:
        with open(p, "rb"):
            pass
    except IsADirectoryError:
        raise UserError(f"{what} is a directory", path) from None
    except OSError as e:
        raise UserError(f"cannot read {what}: {e.strerror}", path) from None
    return p


def nonneg_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds >= 0")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return v


class Progress:
    """Progress on stderr: one rewritten line on a terminal, a line every few seconds otherwise."""

    def __init__(self, what: str, stream=None, every: float = 5.0):
        self.what = what
        self.out = stream or sys.stderr
        self.tty = self.out.isatty()
        self.every = every
        self.last = -every
        self.started = False

    def __call__(self, events: int, seconds: float) -> None:
        if not self.started:
            self.started = True
            print(f"kvmgate: {self.what} (Ctrl-C to stop)", file=self.out, flush=True)
        if self.tty:
            print(f"\r  {events} events, {seconds:.1f} s", end="", file=self.out, flush=True)
        elif seconds - self.last >= self.every:
            self.last = seconds
            print(f"  {events} events, {seconds:.1f} s", file=self.out, flush=True)

    def done(self) -> None:
        if self.tty and self.started:
            print(file=self.out)


class StopOnSignals:
    """SIGINT/SIGTERM set `event` instead of raising, so a recording ends cleanly (main thread)."""

    def __init__(self, event: threading.Event):
        self.event = event
        self.old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)
