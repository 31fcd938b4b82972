"""`kvmgate bench NAME [options]`: the registry in kvmgate.bench."""
from __future__ import annotations

import argparse

from .. import bench


def cmd_bench(a) -> int:
    return bench.main([a.name, *a.rest])


def register(sub) -> None:
    p = sub.add_parser("bench", help=f"benchmarks ({', '.join(bench.BENCHES)})")
    p.add_argument("name", choices=sorted(bench.BENCHES), metavar="NAME",
                   help=", ".join(bench.BENCHES))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    p.set_defaults(fn=cmd_bench)
