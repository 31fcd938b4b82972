"""The `kvmgate` command line.  User mistakes exit 2 with a message, never a traceback."""
from __future__ import annotations

import argparse
import sys

from .errors import KvmError, UserError


def cmd_demo(a) -> int:
    from .demo import run_demo
    from .report import emit
    rows = run_demo()
    if not a.json:
        print("kvmgate demo: a guest probes real MSRs on /dev/kvm; LSTAR writes are filtered,\n"
              "every failure exits to user space, which answers MSR_CORE_THREAD_COUNT and #GPs the rest.\n")
    emit(rows, a.json)
    return 0


def cmd_info(a) -> int:
    from .hostinfo import host_info
    from .report import emit
    info = host_info(a.device)
    if a.json:
        emit(info, True)
        return 0
    print(f"device:                      {info['device']}")
    print(f"KVM API version:             {info['api_version']}")
    for name, v in info["capabilities"].items():
        print(f"{name + ':':<29}{'yes' if v else 'NO'} ({v})")
    im = info["ignore_msrs"]
    print(f"kvm.ignore_msrs:             {'unknown' if im is None else ('Y' if im else 'N')}"
          + ("  (unknown MSRs are swallowed host-wide: no UNKNOWN exits)" if im else ""))
    print(f"MSRs KVM saves/restores:     {info['msrs_saved_by_kvm']}")
    return 0


def cmd_bench(a) -> int:
    from . import bench
    return bench.main(a.rest)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvmgate", description="Per-VM control of guest MSR accesses on Linux KVM.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("demo", help="run a bundled guest that probes MSRs and show where each access went")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("info", help="the host's KVM facts")
    p.add_argument("--device", default="/dev/kvm")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("bench", help="benchmarks (exits)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except UserError as e:
        print(f"kvmgate: error: {e}", file=sys.stderr)
        return 2
    except KvmError as e:
        print(f"kvmgate: KVM error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
