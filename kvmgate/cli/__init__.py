"""The `kvmgate` command line: one module per command group, each with `register(sub)`.

The CLI only parses arguments and prints; the work is done by the library.  User mistakes
exit 2 with a message naming the file, line and field, never a traceback (`common.run_main`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .common import run_main

# The command groups, one module each with register(sub).  Only the group named on the command
# line is imported (all of them for `--help` or an unknown command), so that `kvmgate policy check`
# or an entry point such as kvmgate-qemu (kvmgate.cli.qemu) does not load every group's
# dependencies (numpy, pyarrow, prometheus-client): a command starts in ~0.3 s instead of ~0.9 s.
GROUPS = ("demo", "run", "policy", "bench", "trace", "learn", "introspect", "schema", "image", "wrap")
# Commands a group registers under another name (a test keeps this equal to what they register).
COMMAND_GROUP = {"info": "demo", "reload": "wrap"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the command group it names (when it names one)."""
    ap = argparse.ArgumentParser(prog="kvmgate", description="Per-VM control of guest MSR accesses on Linux KVM.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    first = argv[0] if argv else None
    group = COMMAND_GROUP.get(first, first)
    for name in (group,) if group in GROUPS else GROUPS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(build_parser(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
