"""What every kvmgate entry point shares: error-to-exit-code mapping and MSR arguments."""
from __future__ import annotations

import argparse
import math
import os
import signal
import stat
import sys
import threading
from pathlib import Path

from ..errors import BadArgument, InputFileError, KvmError, UserError
from ..exits import GuestError
from ..guest import MAX_VCPUS
from ..inputs import check_user_file
from ..msr import names


def run_main(ap: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse and dispatch; user mistakes exit 2, failures 1, Ctrl-C 130, never a traceback.
    A bad argument value is one line naming the argument (no usage text)."""
    _one_line_errors(ap)
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
    except BrokenPipeError:
        # the reader went away (`kvmgate info | head`): stop quietly, as cat does; stdout is
        # pointed at /dev/null so that the interpreter's final flush does not complain again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _one_line_errors(ap: argparse.ArgumentParser) -> None:
    ap.exit_on_error = False
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _one_line_errors(sub)


def parse_msrs(words: list[str]) -> list[int]:
    """MSR names or indices from the command line; unknown ones are a UserError with hints."""
    out = []
    for w in words:
        i = names.msr_index(w)
        if i is None:
            hint = names.suggest(w)
            raise BadArgument(f"unknown MSR {w!r}" + (f"; did you mean {', '.join(hint)}?" if hint else ""),
                              "argument MSR")
        out.append(i)
    return out


def out_path(path: str, what: str = "output") -> Path:
    """An output file we can create: its directory exists and is writable, it is not a directory
    (nor a FIFO, socket or block device, which could block or be damaged; a character device
    such as /dev/null or /dev/stderr is taken as given)."""
    p = Path(path)
    if p.is_dir():
        raise BadArgument(f"{what} is a directory", path)
    try:
        mode = p.stat().st_mode
    except OSError:
        mode = None
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
        raise BadArgument(f"{what} must be a regular file (or a character device like /dev/null)", path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise BadArgument(f"cannot write {what}: directory {parent} does not exist", path)
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise BadArgument(f"cannot write {what}: permission denied", path)
    existed = mode is not None
    try:        # the kernel's answer (read-only mounts, /proc, immutable files), appending nothing
        os.close(os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644))
    except OSError as e:
        raise BadArgument(f"cannot write {what}: {e.strerror}", path) from None
    if not existed:
        p.unlink(missing_ok=True)        # nothing is left behind if the run never starts
    return p


def in_path(path: str, what: str) -> Path:
    """An input file that can be read: a regular file (a directory, FIFO or device is refused
    without blocking on it)."""
    try:
        check_user_file(path, what)
    except InputFileError as e:
        if "a directory" in e.what:
            raise BadArgument(f"{what} is a directory", path) from None
        raise
    return Path(path)


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0 (not inf, nan, 0 or negative)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds > 0")
    return v


def port_number(text: str) -> int:
    """argparse type: a TCP port 0..65535 (0: any free port)."""
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a port is 0..65535 (0: any free port)")
    return v


def vcpu_count(text: str) -> int:
    """argparse type: 1..MAX_VCPUS, what a Machine runs."""
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= v <= MAX_VCPUS:
        raise argparse.ArgumentTypeError(f"{text!r}: a machine has 1 to {MAX_VCPUS} vCPUs")
    return v


def writable_file(what: str):
    """argparse type factory: an output file that can be created (see out_path); the check
    runs while arguments are parsed, so nothing starts with an unusable path."""
    def check(text: str) -> str:
        try:
            out_path(text, what)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    check.__name__ = what.replace(" ", "_")
    return check


def nonneg_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds >= 0")
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
