"""`kvmgate bench wrap`: the QEMU shim's per-exit cost (kvmgate.wrap.bench measures it)."""
from __future__ import annotations

import sys

from ..wrap import bench as wrap_bench
from .common import count_arg, emit, parser


def main(argv: list[str]) -> int:
    ap = parser("wrap", wrap_bench.__doc__, rounds=7)
    ap.add_argument("-n", type=count_arg, default=20000, help="RDMSRs per guest run")
    a = ap.parse_args(argv)
    res = wrap_bench.bench_wrap(a.n, a.rounds, lambda i, n: print(f"  round {i}/{n}", file=sys.stderr, flush=True))
    emit(res, a.json, wrap_bench.render(res))
    return 0
