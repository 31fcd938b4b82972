"""Benchmarks, one home: `kvmgate bench NAME [options]` (or `python -m kvmgate.bench NAME`).

BENCHES is the registry: name -> main(argv) -> exit code; each benchmark parses its own
options (bench.common.parser gives the shared --rounds/--json) and follows the method in
bench.common (paired interleaved rounds, medians, load average printed).  To add one, add a
line here, as `BENCHES["replay"] = replay.main` is.  A benchmark that cannot measure what it
promises raises BenchError: printed, exit 1, never a silently missing baseline."""
from __future__ import annotations

import sys
from collections.abc import Callable

from . import exits, introspect, kvmi_wrap, policy, replay, wrap
from .common import BenchError

BENCHES: dict[str, Callable[[list[str]], int]] = {
    "exits": exits.main,          # handler path vs bare C KVM_RUN loop, per exit
    "policy": policy.main,        # compile times; policy handler vs bare handler, per exit
    "vcpus": exits.main_vcpus,    # 1/2/4 vCPU throughput, Python vs C loops
    "wrap": wrap.main,            # the QEMU shim: shim vs QEMU answering, wrapped vs unwrapped
    "replay": replay.main,        # trace replay from Parquet vs DuckDB's GROUP BY, one core
    "introspect": introspect.main,            # MSR event round trip vs a plain user-space exit
    "wrap-introspect": kvmi_wrap.main,        # the same inside a wrapped QEMU (kvmi-v7 tool)
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print(f"usage: kvmgate bench {{{','.join(BENCHES)}}} [options] (--help after the name)",
              file=sys.stderr)
        return 2
    try:
        return BENCHES[argv[0]](argv[1:])
    except BenchError as e:
        print(f"kvmgate bench {argv[0]}: {e}", file=sys.stderr)
        return 1


__all__ = ["BENCHES", "BenchError", "main"]
