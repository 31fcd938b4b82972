"""The `kvmgate` command line: one module per command group, each with `register(sub)`.

The CLI only parses arguments and prints; the work is done by the library.  User mistakes
exit 2 with a message naming the file, line and field, never a traceback (`common.run_main`).
"""
from __future__ import annotations

import argparse
import sys

from . import bench, demo, image, introspect, learn, policy, run, schema, trace, wrap
from .common import run_main

GROUPS = (demo, run, policy, bench, trace, learn, introspect, schema, image, wrap)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvmgate", description="Per-VM control of guest MSR accesses on Linux KVM.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
