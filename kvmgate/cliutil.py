"""What every kvmgate entry point shares: error-to-exit-code mapping and MSR arguments."""
from __future__ import annotations

import argparse
import sys

from .errors import KvmError, UserError
from .exits import GuestError


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
    from .msr import names
    out = []
    for w in words:
        i = names.msr_index(w)
        if i is None:
            hint = names.suggest(w)
            raise UserError(f"unknown MSR {w!r}" + (f"; did you mean {', '.join(hint)}?" if hint else ""),
                            "argument MSR")
        out.append(i)
    return out
