"""The `kvmgate` command line: one module per command group, each with `register(sub)`.

The CLI only parses arguments and prints; the work is done by the library.  User mistakes
exit 2 with a message naming the file, line and field, never a traceback (`common.run_main`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .common import run_main

# The command groups, one module each with register(sub); imported when the parser is built, so
# that an entry point such as kvmgate-qemu (kvmgate.cli.qemu) does not load every group's
# dependencies (numpy, pyarrow, prometheus-client) in a VMM's constrained environment.
GROUPS = ("demo", "run", "policy", "bench", "trace", "learn", "introspect", "schema", "image", "wrap")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvmgate", description="Per-VM control of guest MSR accesses on Linux KVM.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name in GROUPS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
