"""`kvmgate bench ...`."""
from __future__ import annotations


def cmd_bench(a) -> int:
    from .. import bench
    return bench.main(a.rest)


def register(sub) -> None:
    import argparse
    p = sub.add_parser("bench", help="benchmarks (exits, policy, vcpus, wrap)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)
